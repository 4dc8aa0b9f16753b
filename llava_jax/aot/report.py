"""Compiling one step for a target and reading what the compiler says of it: per-device
bytes (ours for the stage's resident trees, the compiler's for temporaries and its peak),
whether it fits (on a TPU target the compiler itself refuses a program that does not:
RESOURCE_EXHAUSTED), compile seconds, and the model's FLOPs per device with the step time
they take at the chip's peak (a lower bound).

The compiler's own FLOP and byte counts (`cost_analysis`) are not used: they count a
while-loop body once, so for scanned layers they are one layer's, not the step's (measured:
sft_13b on v5p-8 gave 142 TFLOP per device against 3328 of model FLOPs).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llava_jax import sharding
from llava_jax.aot.targets import GiB

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory")


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings, or arrays): each
    leaf's shard shape; a replicated leaf counts whole on every device."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Step:
    """One jitted step and its abstract arguments. `params` / `opt` are the trees the STAGE
    keeps on the devices (they may hold more than this step's arguments, e.g. PPO's reward
    base during the rollout); `state_in_args` is how many per-device bytes of them the
    arguments already carry, so the step's own inputs are counted once. `model_flops`: the
    step's useful FLOPs over all devices (6 x params x tokens + attention for a training
    step)."""

    name: str
    fn: Any
    args: tuple
    params: Any
    opt: Any
    state_in_args: int
    note: str = ""
    model_flops: float = 0.0


@dataclasses.dataclass
class StepReport:
    """Per-device figures of one compiled step."""

    name: str
    note: str = ""
    params: int = 0  # the stage's resident params (frozen + trainable)
    opt: int = 0  # the stage's optimiser state
    io: int = 0  # the step's other arguments (batch, step, rng) + outputs not aliased to donated inputs
    temp: int = 0  # compiler temporaries: activations, gradients, caches, collectives' buffers
    compile_seconds: float = 0.0  # lower + compile
    peak: int = 0  # the compiler's own peak for the step's buffers (0: not reported)
    error: str = ""  # the compiler refused it (out of memory)
    model_flops: float = 0.0  # the step's useful FLOPs per device
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # raw memory_analysis figures

    @property
    def total(self) -> int:
        return self.params + self.opt + self.io + self.temp

    def fits(self, device_memory: int) -> bool:
        return not self.error and self.total <= device_memory

    def bound_seconds(self, peak_flops: float) -> float:
        """The step-time lower bound: the model's FLOPs at the chip's peak (100% MFU)."""
        return self.model_flops / peak_flops


def compile_step(step: Step, mesh: Mesh) -> StepReport:
    """Lowers and compiles `step` for `mesh` (forced CPU devices or a target's compile-only
    devices) and reads its memory and cost analyses; an out-of-memory refusal by the
    compiler is reported, not raised."""
    params, opt = device_bytes(step.params), device_bytes(step.opt)
    report = StepReport(step.name, step.note, params, opt, model_flops=step.model_flops / mesh.size)
    start = time.perf_counter()
    try:
        # jax.set_mesh, not `with mesh:`: under the legacy context flax finds no mesh and drops
        # every with_logical_constraint in the models without a word (seen with JAX 0.10).
        with jax.set_mesh(mesh), sharding.activation_rules():
            compiled = step.fn.lower(*step.args).compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        if not any(marker in str(e) for marker in OOM_MARKERS):
            raise
        report.compile_seconds = time.perf_counter() - start
        report.error = next(line for line in str(e).splitlines() if any(m in line for m in OOM_MARKERS)).strip()
        return report
    report.compile_seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"{step.name}: this backend reports no memory analysis")
    memory = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    # Our own count of the arguments, not the compiler's: jit drops arguments the step never
    # reads (lm_head in the RM, CLIP's last norm), but they still sit on the devices.
    report.io = device_bytes(step.args) - step.state_in_args + memory["output"] - memory["alias"]
    report.peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    # The TPU compiler's peak (arguments, live temporaries, outputs at once) is the authority:
    # its temp_size sums temporaries that are never live together (sft_13b on v5p-8: temp
    # 72.9 GiB, peak 82.9 GiB with 36.6 GiB of arguments). Temporaries: the peak less the buffers.
    report.memory = memory
    if report.peak:
        report.temp = max(0, report.peak - memory["argument"] - memory["output"] + memory["alias"])
    else:
        report.temp = memory["temp"]
    return report


def format_table(reports: list[StepReport], memories: dict[str, int], names: dict[str, str] | None = None) -> str:
    """A markdown table: per-device GiB (MiB for tiny models) and fits / no per named memory
    (`names` labels them: a device kind's HBM)."""
    unit, unit_name = (GiB, "GiB") if max((r.total for r in reports), default=0) >= GiB // 4 else (2**20, "MiB")
    cols = ["step", f"params {unit_name}", f"opt state {unit_name}", f"batch+out {unit_name}",
            f"temp {unit_name}", f"total {unit_name}", "compile s"]
    names = names or {}
    cols += [names.get(n, f"{n} ({size / GiB:g} GiB)") for n, size in memories.items()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in reports:
        if r.error:
            cells = [r.name, f"{r.params / unit:.2f}", f"{r.opt / unit:.2f}", "-", "-", "-", f"{r.compile_seconds:.1f}"]
        else:
            cells = [r.name] + [f"{v / unit:.2f}" for v in (r.params, r.opt, r.io, r.temp, r.total)]
            cells.append(f"{r.compile_seconds:.1f}")
        cells += ["yes" if r.fits(m) else "NO" for m in memories.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_costs(reports: list[StepReport], peak_flops: float) -> str:
    """A markdown table: the compiler's peak, model FLOPs per device and the step-time lower bound."""
    lines = ["| step | compiler peak GiB | model TFLOP per device | lower bound s (at peak) |", "|---|---|---|---|"]
    for r in reports:
        peak = f"refused: {r.error}" if r.error else f"{r.peak / GiB:.2f}"
        lines.append(f"| {r.name} | {peak} | {r.model_flops / 1e12:.1f} | {r.bound_seconds(peak_flops):.3f} |")
    return "\n".join(lines)
