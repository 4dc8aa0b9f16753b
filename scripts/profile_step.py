#!/usr/bin/env python
"""Where a step's time goes, op by op: XLA's own per-thunk trace, grouped by what each op is.

  python scripts/profile_step.py --step ppo [--model small]        # bench_ppo --vs-hf's update (4 minibatch steps)
  python scripts/profile_step.py --step ppo-scoring [--model small] # the rollout's scoring passes
  python scripts/profile_step.py --step sft-full | sft-lora         # bench_train's step (8 layers, hidden 512)

The step is built as the benchmarks build it (scripts/bench_ppo_world.py, scripts/bench_train.py),
compiled and run twice, then traced under `jax.profiler` with XLA:CPU's per-thunk trace events
(`--xla_cpu_enable_xprof_traceme`). Each traced op is looked up in the optimised HLO (dumped by
XLA for this run) and grouped: a dot by its operand shapes and contracting dimensions (so the
forward, the input-gradient and the weight-gradient matmuls of one layer are told apart), any
other op by the last part of its JAX op name (dynamic_slice, transpose, ...). The table gives
milliseconds per step, the share of the traced op time and, for dots, GF/s. On a machine with
other work running, every op slows alike: read the shares, not the milliseconds. XLA:CPU may
run independent ops side by side, one core each, so op times can sum to more than the wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMP = tempfile.mkdtemp(prefix="profile_step_hlo_")
# Before jax is imported: per-thunk trace events and the optimised HLO of every program.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_enable_xprof_traceme=true"
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$").strip()
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def ppo_step(a: argparse.Namespace) -> tuple[Callable[[], None], str]:
    """(one traced unit, the jitted function's name): the update phase, or the scoring phase."""
    from scripts.bench_ppo_world import OursPPO, build_config, make_prompts, make_roles, minibatch_orders

    config = build_config(a.model, None, 512)
    base, adapters, head_of = make_roles(config, 8)
    rating = np.random.RandomState(1).randint(3, 511, size=48).astype(np.int32)
    ours = OursPPO(config, base, adapters, head_of, response_len=a.response_len, dtype="float32", rating_ids=rating)
    prompts = make_prompts(config, a.rollout_batch, 16)
    epochs = ours.cfg.ppo.ppo_epochs
    rollout = ours.rollout(prompts, 0, {})
    if a.step == "ppo-scoring":
        return lambda: ours.rollout(prompts, 1, {}) and None, "score_responses|recompute_old"
    orders = minibatch_orders(0, 0, epochs, a.rollout_batch)
    return lambda: ours.update(rollout, orders, a.step_batch, {}) and None, "ppo_step"


def sft_step(a: argparse.Namespace) -> tuple[Callable[[], None], str]:
    from scripts.bench_train import build_models, make_batch, ours_step_fn

    shapes = argparse.Namespace(skip_hf=True, layers=8, hidden=512, vocab=32000, image_size=112, dtype="float32")
    config, base = build_models(shapes)[:2]  # bench_train's defaults, our own random init
    batch = make_batch(4, 512, 32000, config.num_image_tokens, config.image_token_index, 112)
    step = ours_step_fn(a.step.split("-")[1], config, base, batch, 16, 16.0, "float32", 100)
    return lambda: step() and None, "sft_step"


def trace_ops(run: Callable[[], None], rounds: int) -> tuple[collections.Counter, collections.Counter]:
    """Microseconds and counts per traced op name over `rounds` runs (after two untraced ones)."""
    run(), run()
    out = tempfile.mkdtemp(prefix="profile_step_trace_")
    jax.profiler.start_trace(out, create_perfetto_trace=True)
    for _ in range(rounds):
        run()
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)
    micros, counts = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(path))["traceEvents"]:
        if event.get("ph") == "X":
            micros[event["name"]] += event.get("dur", 0.0)
            counts[event["name"]] += 1
    return micros, counts


def hlo_groups(module_pattern: str) -> tuple[dict[str, str], dict[str, float]]:
    """(op name -> group, group -> FLOPs of one op) from the optimised HLO of the modules whose
    name matches `module_pattern`. A fusion whose body is a dot is grouped by the dot."""
    groups, flops = {}, {}
    for path in glob.glob(os.path.join(DUMP, "*.cpu_after_optimizations.txt")):
        name = os.path.basename(path).split(".")[1]
        if not re.fullmatch(f"jit_({module_pattern})", name):
            continue
        text = open(path).read()
        shapes = dict(re.findall(r"%([\w.\-]+)(?::| =) (\w+\[[\d,]*\])", text))  # HLO names are module-unique
        dots, computation = {}, ""
        for m in re.finditer(r"^(?:%([\w.\-]+) \(|\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*))", text, re.M):
            if m.group(1):  # a computation starts
                computation = m.group(1)
                continue
            op, rest = m.group(2), m.group(3)
            dot = re.match(r"(\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", rest)
            if dot:
                lhs, rhs = shapes.get(dot.group(2), "?"), shapes.get(dot.group(3), "?")
                dims = {k: v for k, v in re.findall(r"(\w+_dims)=\{([\d,]*)\}", rest)}
                lhs_c, rhs_c = dims.get("lhs_contracting_dims", ""), dims.get("rhs_contracting_dims", "")
                batch = f", batch {dims['lhs_batch_dims']}" if "lhs_batch_dims" in dims else ""
                label = f"dot {lhs} . {rhs} (contract {lhs_c} | {rhs_c}{batch}) -> {dot.group(1)}"
                flops[label] = 2.0 * _elements(dot.group(1)) * _contracted(lhs, lhs_c)
                groups[op] = dots[computation] = label  # the dot itself, and the fusion calling its computation
            elif (calls := re.search(r"calls=%([\w.\-]+)", rest)) and calls.group(1) in dots:
                groups[op] = dots[calls.group(1)]
            elif (meta := re.search(r'op_name="([^"]*)"', rest)):
                groups.setdefault(op, meta.group(1).split("/")[-1])
    return groups, flops


def _elements(shape: str) -> float:
    dims = re.search(r"\[([\d,]*)\]", shape).group(1)
    return float(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1.0


def _contracted(shape: str, dims: str) -> float:
    sizes = [int(d) for d in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if d]
    return float(np.prod([sizes[int(i)] for i in dims.split(",") if i])) if dims else 1.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", default="ppo", choices=("ppo", "ppo-scoring", "sft-full", "sft-lora"))
    p.add_argument("--model", default="small", choices=("tiny", "small"), help="ppo steps: bench_ppo's shapes")
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="traced runs (the table is per run)")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    run, module = (sft_step if a.step.startswith("sft") else ppo_step)(a)
    micros, counts = trace_ops(run, a.rounds)
    groups, flops = hlo_groups(module)
    table, calls = collections.Counter(), collections.Counter()
    for op, us in micros.items():
        if op in groups:
            table[groups[op]] += us / 1e3 / a.rounds
            calls[groups[op]] += counts[op] // a.rounds
    total = sum(table.values())
    dot_ms = sum(v for k, v in table.items() if k.startswith("dot "))
    print(f"{a.step}: {total:.0f} ms of traced ops per run ({module}); dots {dot_ms:.0f} ms ({dot_ms / total:.0%}); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| {'ms':>8} | {'share':>6} | {'ops':>5} | {'GF/s':>5} | op |\n|---:|---:|---:|---:|---|")
    for key, ms in table.most_common(a.top):
        rate = f"{flops[key] * calls[key] / ms / 1e6:.0f}" if key in flops else ""
        print(f"| {ms:8.1f} | {ms / total:6.1%} | {calls[key]:5d} | {rate:>5} | {key} |")


if __name__ == "__main__":
    main()
