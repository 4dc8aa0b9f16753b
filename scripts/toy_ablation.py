#!/usr/bin/env python
"""The toy world's Fact-RLHF experiment over several seeds, with the facts ablation:

  python scripts/toy_ablation.py [--seeds 0,1,2] [--out runs/toy_ablation]

Per seed, the README's chain with `--config.seed=SEED` on every stage: tiny_sft, then the
reward model with facts (tiny_rm) and without (tiny_rm_nofacts) over that SFT model, then
PPO against each (tiny_ppo, tiny_ppo_nofacts), each ending with the held-out evaluation
(llava_jax/eval/toy_eval.py). Prints, per seed and as mean [min, max] over the seeds: the RMs'
held-out accuracy, and hallucinating answers, recall and answer length of the SFT policy and
of both PPO policies. Runs under OUT/seed_N/ (a finished stage is not rerun); OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = ("tiny_sft", "tiny_rm", "tiny_rm_nofacts", "tiny_ppo", "tiny_ppo_nofacts")


def stage_config(name: str, seed: int, root: str):
    """configs/NAME.py for this seed, its inputs and workdir under root."""
    from llava_jax.settings import RunSettings, load_config_file

    cfg = load_config_file(os.path.join("configs", f"{name}.py"))
    cfg.seed, cfg.requires, cfg.workdir = seed, "", os.path.join(root, name)
    if name != "tiny_sft":
        cfg.model.init = os.path.join(root, "tiny_sft", "model")
    if name.startswith("tiny_ppo"):
        cfg.ppo.reward_adapter = os.path.join(root, name.replace("ppo", "rm"), "adapter")
    return RunSettings.from_config(cfg)


def run_seed(seed: int, root: str) -> dict:
    from llava_jax.train.metrics import read_metrics
    from llava_jax.stages import exported_result, run_stage

    out: dict = {"seconds": {}}
    for name in STAGES:
        cfg = stage_config(name, seed, root)
        summary = os.path.join(cfg.workdir, "eval", "summary.json")
        if not (os.path.isfile(summary) if name.startswith("tiny_ppo") else exported_result(cfg)):
            begin = time.perf_counter()
            run_stage(cfg)
            out["seconds"][name] = round(time.perf_counter() - begin, 1)
        if name.startswith("tiny_rm"):
            evals = [r for r in read_metrics(os.path.join(cfg.workdir, "metrics.jsonl")) if "eval_accuracy" in r]
            out[name] = {"accuracy": evals[-1]["eval_accuracy"]}
        elif name.startswith("tiny_ppo"):
            with open(summary) as f:
                summary = json.load(f)
            out["sft"], out[name] = summary["sft"], summary["ppo"]
    return out


def table(results: dict[int, dict]) -> str:
    rows = [("RM held-out accuracy, with facts", "tiny_rm", "accuracy"),
            ("RM held-out accuracy, without facts", "tiny_rm_nofacts", "accuracy")]
    for model, label in (("sft", "SFT"), ("tiny_ppo", "PPO with facts"), ("tiny_ppo_nofacts", "PPO without facts")):
        rows += [(f"{label}: answers naming an absent object", model, "hallucinating_answers"),
                 (f"{label}: recall of present objects", model, "recall"),
                 (f"{label}: mean answer tokens", model, "mean_length"),
                 (f"{label}: POPE F1 / yes-ratio", model, ("pope_f1", "pope_yes_ratio")),
                 (f"{label}: multiple-choice accuracy", model, "mc_accuracy")]
    seeds = sorted(results)
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
             "|---" * (len(seeds) + 2) + "|"]
    for label, model, keys in rows:
        columns = []
        for key in keys if isinstance(keys, tuple) else (keys,):
            values = [results[s][model][key] for s in seeds]
            fmt = "{:.1f}" if key == "mean_length" else "{:.3f}"
            spread = f"{fmt.format(sum(values) / len(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"
            columns.append([fmt.format(v) for v in values] + [spread])
        lines.append(f"| {label} | " + " | ".join(" / ".join(cell) for cell in zip(*columns)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/toy_ablation")
    a = p.parse_args(argv)
    results = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        results[seed] = run_seed(seed, os.path.join(a.out, f"seed_{seed}"))
        print(f"seed {seed}: stage seconds {results[seed]['seconds']}", flush=True)
    print(table(results))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
