#!/usr/bin/env python
"""Seconds per training step of the whole loop (data, dispatch, metrics, checkpoint glue),
this checkout against another git revision, on 8 forced CPU devices:

  python scripts/bench_loop.py --before e193346 --rounds 3

Each measurement is one process running the tiny SFT stage (configs/tiny_sft.py) on the
(1, 8, 1) mesh three times: a warm-up run that compiles, then N_short and N_long steps; the
per-step time is (wall(N_long) - wall(N_short)) / (N_long - N_short), which cancels start-up,
data set-up and compilation (the persistent compile cache serves the timed runs). Rounds alternate before / after; the table shows medians.
The revision is checked out into a temporary git worktree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CHILD = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from configs.tiny_sft import get_config
try:  # this checkout: typed settings and the SFT/RM loop
    from llava_jax.settings import RunSettings
    from llava_jax.train.loop import run_train
    run = lambda cfg: run_train(RunSettings.from_config(cfg))
except ImportError:  # revisions before the drivers were rebuilt
    from llava_jax.trainer import run
def wall(steps, name):
    cfg = get_config()
    cfg.workdir, cfg.train.max_steps, cfg.mesh.fsdp = os.path.join(sys.argv[1], name), steps, 8
    cfg.checkpoint.every, cfg.log.tensorboard, cfg.data.num_buckets = 10**6, False, 1
    cfg.optim.schedule = "constant"
    begin = time.perf_counter()
    run(cfg)
    return time.perf_counter() - begin
wall(int(sys.argv[2]), "warm")  # compiles; the cache serves the timed runs
short, long = wall(int(sys.argv[2]), "short"), wall(int(sys.argv[3]), "long")
print("MS_PER_STEP", 1e3 * (long - short) / (int(sys.argv[3]) - int(sys.argv[2])))
"""


def ms_per_step(tree: str, short: int, long: int, tmp: str) -> float:
    """Loop time per step in one process: (wall(long) - wall(short)) / (long - short) after a
    warm-up run, so start-up, data set-up and compilation cancel."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(short), str(long)], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("MS_PER_STEP")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=220)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        subprocess.run(["git", "worktree", "add", "--detach", before, args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            per_step: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for name, tree in (("before", before), ("after", ROOT)):
                    per_step[name].append(ms_per_step(tree, args.short, args.long, tempfile.mkdtemp(dir=tmp)))
                    print(f"round {r + 1} {name}: {per_step[name][-1]:.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT, capture_output=True)
    b, a = statistics.median(per_step["before"]), statistics.median(per_step["after"])
    print(f"\n| loop (tiny SFT, mesh 1x8x1, 8 CPU devices) | ms/step, median of {args.rounds} |")
    print("|---|---|")
    print(f"| before ({args.before}) | {b:.1f} |")
    print(f"| after (this checkout) | {a:.1f} |")
    print(f"loop step before/after: {b / a:.2f}x")


if __name__ == "__main__":
    main()
