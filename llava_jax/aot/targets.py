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

A GPU target names hosts of NVIDIA GPUs: `h100-8` (one host of 8 H100 SXM), `h200-8`,
`h100-1`, `h100-8x2` (2 hosts of 8). Its devices come from JAX's CUDA plugin
(`pip install -e '.[gpu]'`), which builds a compile-only topology from a written device
description (`gpu_target_config`: the sm_90 figures XLA's GPU compiler reads) without a GPU or a
driver, so `compile()` runs XLA's real CUDA pipeline (cuBLAS/Triton GEMM rewrites, cuDNN
fused attention, NCCL collectives, the GPU buffer assignment). Unlike the TPU compiler it does
not refuse a program larger than the device: the check compares the compiled per-device total
with the device memory itself.
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
    def memory_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def peak_flops(self) -> float:
        return self.generation.peak_flops

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


def parse_target(name: str) -> TpuTarget | GpuTarget:
    """'tpu-v5e-8', 'tpu-v4-16', 'tpu-v5p-8', 'tpu-v6e-16x2' -> TpuTarget; 'h100-8', 'h200-8',
    'h100-1', 'h100-8x2' -> GpuTarget."""
    if not name.startswith("tpu-"):
        return parse_gpu_target(name)
    m = re.fullmatch(r"tpu-(v4|v5e|v5p|v6e)-(\d+)(?:x(\d+))?", name)
    if not m:
        raise ValueError(f"unknown target {name!r}: expected tpu-<v4|v5e|v5p|v6e>-<size>[x<slices>], "
                         f"e.g. tpu-v5e-8, tpu-v4-16, tpu-v5p-8x2, or {GPU_TARGET_FORM}")
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


def target_devices(target: TpuTarget | GpuTarget) -> list:
    """The target's devices from libtpu's (or the CUDA plugin's) topology description
    (compile-only devices)."""
    if isinstance(target, GpuTarget):
        return gpu_devices(target)
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


# ------------------------------------------------------------------------------ GPUs

GPU_TARGET_FORM = "h100-<gpus per host>[x<hosts>] or h200-<gpus>[x<hosts>], e.g. h100-8, h200-8, h100-1, h100-8x2"


@dataclasses.dataclass(frozen=True)
class GpuModel:
    name: str  # h100 | h200
    description: str  # the device name CUDA reports (XLA's device_description_str)
    memory_bytes: int  # per device: the total CUDA reports (cudaMemGetInfo), less than the marketing GB
    memory_bandwidth: int  # bytes/s
    peak_flops: float  # bfloat16 dense, per device


# SXM parts, published figures; both are sm_90 (Hopper) with 132 SMs and a 50 MiB L2.
GPU_MODELS = {
    "h100": GpuModel("h100", "NVIDIA H100 80GB HBM3", 85_045_477_376, 3_352_320_000_000, 989e12),
    "h200": GpuModel("h200", "NVIDIA H200 141GB HBM3e", 151_397_597_184, 4_800_000_000_000, 989e12),
}

# What jax 0.10.2's CUDA 12 plugin is built against (CUDA 12.9, cuDNN 9.8): the compiler gates
# features (cuDNN fused attention's variants, CUDA graph kinds) on these, so the description
# claims the oldest libraries the `gpu` extra can run with, never a newer one.
_RUNTIME_VERSION, _DNN_VERSION = (12, 9), (9, 8)


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str
    model: GpuModel
    gpus: int  # per host
    hosts: int = 1

    @property
    def num_devices(self) -> int:
        return self.gpus * self.hosts

    @property
    def memory_bytes(self) -> int:
        return self.model.memory_bytes

    @property
    def peak_flops(self) -> float:
        return self.model.peak_flops

    @property
    def topology(self) -> str:
        """The CUDA plugin's topology string: slices x hosts x devices per host."""
        return f"1x{self.hosts}x{self.gpus}"


def parse_gpu_target(name: str) -> GpuTarget:
    """'h100-8', 'h200-8', 'h100-1', 'h100-8x2' -> GpuTarget."""
    m = re.fullmatch(r"(h100|h200)-(\d+)(?:x(\d+))?", name)
    if not m:
        raise ValueError(f"unknown target {name!r}: expected cpu, tpu-<v4|v5e|v5p|v6e>-<size>[x<slices>] "
                         f"or {GPU_TARGET_FORM}")
    gpus, hosts = int(m.group(2)), int(m.group(3) or 1)
    if gpus not in (1, 2, 4, 8) or hosts < 1:
        raise ValueError(f"{name}: a host holds 1, 2, 4 or 8 GPUs (and hosts >= 1): {GPU_TARGET_FORM}")
    return GpuTarget(name, GPU_MODELS[m.group(1)], gpus, hosts)


def gpu_target_config(model: GpuModel) -> str:
    """XLA's GpuTargetConfig (text proto) for `model`: what the GPU compiler reads of a device
    when it has none (SM count and limits, memory, bandwidth, compute capability 9.0)."""
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: 49152  shared_memory_per_core: 233472  shared_memory_per_block_optin: 232448
  core_count: 132  fpus_per_core: 128  clock_rate_ghz: 1.98  l2_cache_size: 52428800
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
  memory_bandwidth: {model.memory_bandwidth}  device_memory_size: {model.memory_bytes}
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
runtime_version {{ major: {_RUNTIME_VERSION[0]} minor: {_RUNTIME_VERSION[1]} }}
dnn_version_info {{ major: {_DNN_VERSION[0]} minor: {_DNN_VERSION[1]} }}
device_description_str: "{model.description}"
"""


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA PJRT plugin (jax-cuda12-plugin / -cuda13-plugin) is installed."""
    import importlib.util

    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def gpu_devices(target: GpuTarget) -> list:
    """The target's compile-only GPU devices from the CUDA plugin's topology (no GPU needed)."""
    if not cuda_plugin_installed():
        raise ValueError(f"--target {target.name} needs JAX's CUDA plugin: pip install -c constraints.txt "
                         "-e '.[gpu]' (compiles for the GPU without one)")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                            target_config=gpu_target_config(target.model))
    devices = list(topology.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(f"{target.name}: the CUDA plugin gave {len(devices)} devices, expected {target.num_devices}")
    return devices
