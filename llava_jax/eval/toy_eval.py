"""Held-out evaluation on the toy "shapes" world: does RLHF lower hallucination?

Greedy answers of each model to the world's held-out questions (images in no training
file): the describe questions, judged against the images' captions by the toy judge
(`llava_jax/eval/toy_judge.py`), the POPE-style yes/no questions and the multiple-choice
questions. `compare` writes OUT/NAME.answers.jsonl (describe answers: question_id, image,
text, ...), OUT/NAME.pope.jsonl, OUT/NAME.mc.jsonl and OUT/summary.json, and returns the
summary; `format_table` renders it. The PPO driver runs it at the end of a toy run
(`eval.toy_dir`); `scripts/eval_toy.py` runs it for any checkpoints and adapters.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from jax.sharding import Mesh

from llava_jax.generate.answer import answer_batches
from llava_jax.data import EvalDataset, load_captions, vision_kwargs, write_answers
from llava_jax.data.eval_data import make_answer
from llava_jax.eval.toy_judge import describe_scores
from llava_jax.data.records import correctness
from llava_jax.eval.pope import pope_scores
from llava_jax.generate.sampling import SamplingConfig

# (summary key, column title, format) of the before/after table, in order.
COLUMNS = (("hallucinating_answers", "answers naming an absent object", "{:.3f}"),
           ("absent_object_share", "named objects absent", "{:.3f}"),
           ("recall", "recall of present objects", "{:.3f}"),
           ("mean_length", "mean answer tokens", "{:.1f}"),
           ("no_object_share", "answers with no object", "{:.3f}"),
           ("pope_accuracy", "POPE acc", "{:.3f}"), ("pope_f1", "POPE F1", "{:.3f}"),
           ("pope_yes_ratio", "POPE yes-ratio", "{:.3f}"), ("mc_accuracy", "MC acc", "{:.3f}"))
FILES = {"answers": "questions.jsonl", "pope": "pope.jsonl", "mc": "mc.jsonl"}


def _answer_file(config: Any, base: dict, adapter: Any, tokenizer: Any, path: str, image_folder: str,
                 sampling: SamplingConfig, batch_size: int, mesh: Mesh) -> list[tuple[Any, str, int]]:
    dataset = EvalDataset(path, tokenizer, image_folder=image_folder, max_length=128, strict=True,
                          **vision_kwargs(config))
    return [row for rows in answer_batches(config, base, adapter, tokenizer, dataset, sampling, batch_size,
                                                 mesh=mesh)
            for row in rows]


def evaluate_model(name: str, config: Any, base: dict, adapter: Any, tokenizer: Any, toy_dir: str, out_dir: str,
                   max_new_tokens: int = 32, batch_size: int = 64, *, mesh: Mesh) -> dict[str, float]:
    """One model's greedy answers to the held-out set, written under out_dir, and its scores;
    weights, prompts and KV cache sharded over `mesh`."""
    sampling = SamplingConfig.greedy(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                     pad_id=tokenizer.pad_id, cache_dtype="float32")
    captions = load_captions(os.path.join(toy_dir, "captions.json"))
    images = os.path.join(toy_dir, "images")
    scores: dict[str, float] = {}
    for kind, file in FILES.items():
        rows = _answer_file(config, base, adapter, tokenizer, os.path.join(toy_dir, "eval", file), images, sampling,
                            batch_size, mesh)
        records = [{**make_answer(q, text, model_id=name), "image": q.image} for q, text, _ in rows]
        write_answers(os.path.join(out_dir, f"{name}.{kind}.jsonl"), records)
        texts = [text for _, text, _ in rows]
        if kind == "answers":
            scores.update(describe_scores(texts, [captions[q.image] for q, _, _ in rows]))
            scores["mean_length"] = sum(n for _, _, n in rows) / max(len(rows), 1)
        elif kind == "pope":
            pope = pope_scores(texts, [q.label for q, _, _ in rows])
            scores.update(pope_accuracy=pope["accuracy"], pope_f1=pope["f1"], pope_yes_ratio=pope["yes_ratio"])
        else:
            right = [correctness(t, 2 + "ABCD".index(q.record["answer"])) for q, t, _ in rows]
            scores["mc_accuracy"] = sum(right) / max(len(right), 1)
    return scores


def compare(models: Sequence[tuple[str, Any, dict, Any]], tokenizer: Any, toy_dir: str, out_dir: str,
            max_new_tokens: int = 32, batch_size: int = 64, *, mesh: Mesh) -> dict[str, dict[str, float]]:
    """models: (name, config, base, adapter or None) -> {name: scores}; writes out_dir/summary.json."""
    summary = {name: evaluate_model(name, config, base, adapter, tokenizer, toy_dir, out_dir, max_new_tokens,
                                    batch_size, mesh=mesh) for name, config, base, adapter in models}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """The before/after table (markdown), one row per model."""
    lines = ["| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, scores in summary.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(scores[key]) for key, _, fmt in COLUMNS) + " |")
    n = next(iter(summary.values()), {}).get("n", 0)
    lines.append(f"(greedy, held-out images; {n} describe questions judged against the images' captions)")
    return "\n".join(lines)
