#!/usr/bin/env python
"""Plot a run's metrics.jsonl: one subplot per numeric key against step.

  python scripts/plot_metrics.py RUN_DIR [--out FILE.png] [--keys loss,accuracy,...]

Reads RUN_DIR/metrics.jsonl (as written by llava_jax.train.metrics.MetricsWriter), writes
RUN_DIR/metrics.png unless --out is given, and prints the path. Without --keys every key
with a numeric value is plotted, in first-logged order. Missing or null (non-finite)
values leave gaps rather than being drawn as zero.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax.train.metrics import numeric_keys, plot, read_metrics  # noqa: E402


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
