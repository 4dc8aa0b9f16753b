"""Compile targets: the accelerators a step can be compiled for from a host that has none.

A TPU target names a slice the way clouds rent them (`tpu-v5e-8`, `tpu-v4-16`, `tpu-v5p-8`,
`tpu-v6e-8`; `xN` appended for N slices, e.g. `tpu-v5e-16x2`). Its devices come from
libtpu's topology description (`jax.experimental.topologies.get_topology_desc`), so
`jax.jit(...).lower(...).compile()` runs the real TPU compiler: its memory analysis is what
the chip will allocate, and a program that does not fit fails to compile with the compiler's
own RESOURCE_EXHAUSTED. libtpu comes with `pip install -e '.[tpu]'`; nothing else is needed
(no TPU, no environment variables).

Slice names: v4 and v5p count TensorCores (two per chip, one "megacore" device per chip), so
v4-8 is 4 chips; v5e and v6e count chips. The per-chip figures (HBM, bfloat16 peak) are the
published ones.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # v4 | v5e | v5p | v6e
    topology_prefix: str  # libtpu's topology name prefix
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    cores_per_chip: int  # what the slice name counts per chip
    chip_config: str  # libtpu chip config
    hbm_bytes: int  # per device (chip)
    peak_flops: float  # bfloat16 dense, per device (chip)


GENERATIONS = {
    "v4": Generation("v4", "v4", 3, 2, "megacore", 32 * GiB, 275e12),
    "v5e": Generation("v5e", "v5e", 2, 1, "default", 16 * GiB, 197e12),
    "v5p": Generation("v5p", "v5", 3, 2, "megacore", 95 * GiB, 459e12),
    "v6e": Generation("v6e", "v6e", 2, 1, "default", 32 * GiB, 918e12),
}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    name: str
    generation: Generation
    chips: int  # per slice
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices

    @property
    def topology(self) -> str:
        """libtpu's name of one slice's chip grid: v5e:2x4, v4:2x2x2, ..."""
        return f"{self.generation.topology_prefix}:{'x'.join(str(d) for d in chip_grid(self.chips, self.generation.dims))}"


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a slice, as the clouds build them: the most cubic shape, ascending
    (8 -> 2x4 in 2-D, 2x2x2 in 3-D; 16 -> 4x4, 2x2x4), and a 2x2x1 tray for 4 chips in 3-D."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: slices hold a power of two")
    grid = [1] * dims
    for _ in range(int(math.log2(chips))):
        grid[grid.index(min(grid))] *= 2
    return tuple(sorted(grid, reverse=dims == 3 and chips < 8))


def parse_target(name: str) -> TpuTarget:
    """'tpu-v5e-8', 'tpu-v4-16', 'tpu-v5p-8', 'tpu-v6e-16x2' -> TpuTarget."""
    m = re.fullmatch(r"tpu-(v4|v5e|v5p|v6e)-(\d+)(?:x(\d+))?", name)
    if not m:
        raise ValueError(f"unknown target {name!r}: expected tpu-<v4|v5e|v5p|v6e>-<size>[x<slices>], "
                         "e.g. tpu-v5e-8, tpu-v4-16, tpu-v5p-8x2")
    gen = GENERATIONS[m.group(1)]
    size, slices = int(m.group(2)), int(m.group(3) or 1)
    if size % gen.cores_per_chip:
        raise ValueError(f"{name}: {gen.name} slice sizes count {gen.cores_per_chip} cores per chip")
    chips = size // gen.cores_per_chip
    try:
        chip_grid(chips, gen.dims)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return TpuTarget(name, gen, chips, slices)


def target_devices(target: TpuTarget) -> list:
    """The target's devices from libtpu's topology description (compile-only devices)."""
    try:
        from jax.experimental import topologies
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--target {target.name} needs libtpu: pip install -e '.[tpu]' ({e})") from None
    # Compiling needs no exclusive hold of a TPU: let several processes load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    grid = chip_grid(target.chips, target.generation.dims)
    host = tuple(min(g, 2) for g in grid) + (1,) * (3 - len(grid))
    topology = topologies.get_topology_desc(
        topology_name=target.topology, platform="tpu", chip_config_name=target.generation.chip_config,
        chips_per_host_bounds=host[:3], num_slices=target.num_slices, wrap=(False, False, False))
    devices = list(topology.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(f"{target.name}: libtpu gave {len(devices)} devices, expected {target.num_devices}")
    return devices
