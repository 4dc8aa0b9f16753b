#!/usr/bin/env python
"""Hallucination on the toy world's held-out images, before and after RLHF (our offline
stand-in for the paper's MMHal-Bench / POPE table):

  python scripts/eval_toy.py sft=runs/tiny_sft/model ppo=runs/tiny_sft/model:runs/tiny_ppo/adapter \\
      [--out runs/eval_toy] [--toy-dir data/toy] [--mesh fsdp=-1] [--dtype float32|bfloat16]

Each MODEL is NAME=CKPT[:ADAPTER] (ADAPTER: an adapter directory, e.g. a run's
workdir/adapter, or an adapter name inside CKPT). Greedy answers to the held-out describe,
POPE-style and multiple-choice questions (llava_jax/eval/toy_eval.py); prints the before/after
table and writes OUT/NAME.answers.jsonl (describe), NAME.pope.jsonl, NAME.mc.jsonl and
OUT/summary.json. Weights, prompts and KV cache are sharded over a mesh of every local device
(`--mesh`, as training's mesh). `python scripts/train.py --config configs/tiny_ppo.py` ends with the same
evaluation of its SFT and PPO policies.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> dict:
    import jax

    from llava_jax.platforms import skip_absent_tpu

    skip_absent_tpu()  # before any backend starts
    from llava_jax import sharding
    from llava_jax.generate.answer import load_answering_model
    from llava_jax.data import load_tokenizer
    from llava_jax.files import ConversionError
    from llava_jax.eval.toy_eval import compare, format_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=CKPT[:ADAPTER]")
    p.add_argument("--toy-dir", default="data/toy")
    p.add_argument("--out", default="runs/eval_toy")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mesh", default="fsdp=-1", help="AXIS=SIZE[,...] over data, fsdp, tensor (-1: fill)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute")
    a = p.parse_args(argv)
    try:
        mesh = sharding.make_mesh(sharding.parse_mesh(a.mesh))
    except ValueError as e:
        p.error(str(e))
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s)")
    models = []
    for spec in a.models:
        name, _, path = spec.partition("=")
        ckpt, _, adapter = path.partition(":")
        if not name or not ckpt:
            p.error(f"model {spec!r}: expected NAME=CKPT[:ADAPTER]")
        try:
            models.append((name, *load_answering_model(ckpt, adapter or None, a.dtype, mesh=mesh)))
        except (ConversionError, OSError, ValueError) as e:
            sys.exit(f"error: model {name}: {e}")
    tokenizer = load_tokenizer(os.path.join(a.toy_dir, "tokenizer"))
    summary = compare(models, tokenizer, a.toy_dir, a.out, a.max_new_tokens, a.batch_size, mesh=mesh)
    print(format_table(summary))
    print(f"answers and summary.json in {a.out}")
    return summary


if __name__ == "__main__":
    main()
