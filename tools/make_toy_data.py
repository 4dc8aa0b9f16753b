#!/usr/bin/env python
"""Writes the bundled toy "shapes" world (images, captions, SFT / preference / RL / eval files
and a small HF tokenizer) into data/toy/. Deterministic: rerunning reproduces the bundle.

  python tools/make_toy_data.py [--out data/toy] [--seed 0]

See llava_jax/data/toy.py for what each file holds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax.data.toy import TOY_DIR, write_toy_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=TOY_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    world = write_toy_world(args.out, args.seed)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.out) for f in files)
    counts = ", ".join(f"{k}={len(world[k])}" for k in ("sft", "pretrain", "preference", "rl_prompts", "pope",
                                                        "questions", "mc", "mmhal"))
    print(f"wrote {args.out}: {len(world['scenes'])} images, {counts}; {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
