#!/usr/bin/env python
"""Hallucination on the toy world before and after RLHF (our offline stand-in for the
paper's MMHal-Bench / POPE table):

  python scripts/eval_toy.py sft=runs/tiny_sft/model ppo=runs/tiny_sft/model:runs/tiny_ppo/adapter

Each MODEL is NAME=CKPT[:ADAPTER]. Greedy answers (scripts/generate.py) to the bundled toy
POPE questions and MMHal-style questions; POPE accuracy / F1 / yes-ratio and its
hallucination rate (share of absent objects answered "yes"), and the MMHal-style
hallucination rate from the toy judge (llava_jax/data/toy_judge.py: an answer that claims
a shape or coloured shape the image's captions lack).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOY = "data/toy"


def evaluate(ckpt: str, adapter: str | None, out_dir: str, max_new_tokens: int) -> dict:
    from llava_jax.data import load_captions
    from llava_jax.data.toy_judge import hallucination_rate
    from llava_jax.pope import pope_answer
    from scripts.generate import main as generate

    common = ["--ckpt", ckpt, "--tokenizer", f"{TOY}/tokenizer", "--image-folder", f"{TOY}/images",
              "--max-new-tokens", str(max_new_tokens)] + (["--adapter", adapter] if adapter else [])
    pope = generate(common + ["--questions", f"{TOY}/eval/pope.jsonl", "--format", "pope",
                              "--out", os.path.join(out_dir, "pope.jsonl")])["all"]
    with open(f"{TOY}/eval/pope.jsonl") as f:
        labels = {q["question_id"]: q["label"] for q in map(json.loads, f)}
    with open(os.path.join(out_dir, "pope.jsonl")) as f:
        answers = [json.loads(line) for line in f]
    absent = [a for a in answers if labels[a["question_id"]] == "no"]
    pope_halluc = sum(pope_answer(a["text"]) == "yes" for a in absent) / max(len(absent), 1)

    mmhal_out = os.path.join(out_dir, "mmhal.json")
    generate(common + ["--questions", f"{TOY}/eval/mmhal.json", "--format", "mmhal", "--out", mmhal_out])
    captions = load_captions(f"{TOY}/captions.json")
    with open(mmhal_out) as f:
        items = json.load(f)
    rate = hallucination_rate([it["model_answer"] for it in items], [captions[it["image_path"]] for it in items])
    return {"pope_accuracy": pope["accuracy"], "pope_f1": pope["f1"], "pope_yes_ratio": pope["yes_ratio"],
            "pope_hallucination": pope_halluc, "mmhal_hallucination": rate, "mmhal_n": len(items),
            "example": items[0]["model_answer"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=CKPT[:ADAPTER]")
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    results = {}
    for spec in a.models:
        name, _, path = spec.partition("=")
        ckpt, _, adapter = path.partition(":")
        with tempfile.TemporaryDirectory() as out_dir:
            results[name] = evaluate(ckpt, adapter or None, out_dir, a.max_new_tokens)
    print("\n| model | POPE acc | POPE F1 | yes-ratio | POPE hallucination (yes on absent) | MMHal-toy hallucination |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['pope_accuracy']:.3f} | {r['pope_f1']:.3f} | {r['pope_yes_ratio']:.3f} | "
              f"{r['pope_hallucination']:.3f} | {r['mmhal_hallucination']:.3f} (n={r['mmhal_n']}) |")
    for name, r in results.items():
        print(f"{name}: first MMHal-toy answer: {r['example']!r}")
    return results


if __name__ == "__main__":
    main()
