#!/usr/bin/env python
"""Seconds per training step of the whole loop (data, dispatch, metrics, checkpoint glue),
this checkout against another git revision, on 8 forced CPU devices:

  python scripts/bench_loop.py --before e193346 --rounds 3

Each run is `scripts/train.py --config configs/tiny_sft.py` on the (1, 8, 1) mesh; a
revision's per-step time is (wall(N_long) - wall(N_short)) / (N_long - N_short), which
cancels start-up and compilation. Rounds alternate before / after; the table shows medians.
The revision is checked out into a temporary git worktree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seconds(tree: str, steps: int, workdir: str) -> float:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": tree}
    cmd = [sys.executable, os.path.join(tree, "scripts", "train.py"), "--config", "configs/tiny_sft.py",
           f"--config.workdir={workdir}", f"--config.train.max_steps={steps}", "--config.mesh.fsdp=8",
           "--config.checkpoint.every=1000", "--config.log.tensorboard=False", "--config.data.num_buckets=1",
           "--config.optim.schedule=constant"]
    begin = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=110)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        subprocess.run(["git", "worktree", "add", "--detach", before, args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            per_step: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for name, tree in (("before", before), ("after", ROOT)):
                    walls = [run_seconds(tree, n, os.path.join(tmp, f"{name}{r}_{n}")) for n in (args.short, args.long)]
                    per_step[name].append((walls[1] - walls[0]) / (args.long - args.short))
                    print(f"round {r + 1} {name}: {per_step[name][-1] * 1e3:.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT, capture_output=True)
    b, a = statistics.median(per_step["before"]), statistics.median(per_step["after"])
    print(f"\n| loop (tiny SFT, mesh 1x8x1, 8 CPU devices) | ms/step, median of {args.rounds} |")
    print("|---|---|")
    print(f"| before ({args.before}) | {b * 1e3:.1f} |")
    print(f"| after (this checkout) | {a * 1e3:.1f} |")
    print(f"loop step before/after: {b / a:.2f}x")


if __name__ == "__main__":
    main()
