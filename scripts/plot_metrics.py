#!/usr/bin/env python
"""Plot a run's metrics.jsonl: one subplot per numeric key against step.

  python scripts/plot_metrics.py RUN_DIR [--out FILE.png] [--keys loss,accuracy,...]

Reads RUN_DIR/metrics.jsonl (as written by llava_jax.metrics.MetricsWriter), writes
RUN_DIR/metrics.png unless --out is given, and prints the path. Without --keys every key
with a numeric value is plotted, in first-logged order. Missing or null (non-finite)
values leave gaps rather than being drawn as zero.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: training hosts have no display
import matplotlib.pyplot as plt  # noqa: E402

from llava_jax.metrics import read_metrics  # noqa: E402


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(records: list[dict]) -> list[str]:
    """Keys (other than step) holding a number in at least one record, first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and _is_number(value):
                keys.setdefault(key, None)
    return list(keys)


def plot(records: list[dict], keys: list[str], out: str, title: str = "") -> None:
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rows = sorted((r["step"], r[key]) for r in records if key in r)
        steps = [s for s, _ in rows]
        values = [v if _is_number(v) else math.nan for _, v in rows]  # nan -> gap in the line
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    parser.add_argument("--keys", default=None, help="comma-separated metric names (default: all numeric)")
    args = parser.parse_args(argv)

    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        parser.error(f"{path} not found")
    records = read_metrics(path)
    available = numeric_keys(records)
    if args.keys:
        keys = [k.strip() for k in args.keys.split(",") if k.strip()]
        unknown = [k for k in keys if k not in available]
        if unknown:
            parser.error(f"no numeric values for {unknown}; available: {available}")
    else:
        keys = available
    if not keys:
        parser.error(f"{path} has no numeric metrics to plot")

    out = args.out or os.path.join(args.run_dir, "metrics.png")
    plot(records, keys, out, title=os.path.basename(os.path.normpath(args.run_dir)))
    print(out)
    return out


if __name__ == "__main__":
    main()
