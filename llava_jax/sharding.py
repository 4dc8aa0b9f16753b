"""Meshes and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded
across it) and `tensor` (heads / MLP / vocab split). Params, adapters, optimiser state,
KV caches and batches all get `NamedSharding`s derived from their logical names; a
dimension that a mesh axis does not divide is replicated instead (tiny models on many
devices), so the same code runs on 1 CPU, 8 forced CPU devices, GPUs and TPU slices.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). Params: embed/vocab/mlp/heads;
# activations: batch/length/act_*; caches: cache_length.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(shape: Sequence[int] | dict[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 to fill the devices; a shape that does not fit is a clear error."""
    if isinstance(shape, dict):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; expected {MESH_AXES}")
        shape = [shape.get(axis, 1) for axis in MESH_AXES]
    shape = [int(s) for s in shape]
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape} must be 3 positive sizes (data, fsdp, tensor), at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {shape} cannot fill {num_devices} devices ({num_devices} % {known} != 0)")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) > num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"but {num_devices} are available")
    return tuple(shape)


def parse_mesh(text: str) -> dict[str, int]:
    """`--mesh` of the evaluation scripts: "fsdp=-1" or "data=2,fsdp=4" (axes left out are 1)
    -> {axis: size}; -1 fills the devices (the default "fsdp=-1": every device, as training)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, size = part.partition("=")
        if not sep or axis not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE] with AXIS in {MESH_AXES}")
        out[axis] = int(size)
    return out


def make_mesh(shape: Sequence[int] | dict[str, int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default all); a fully given shape may use only the first N."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices[:math.prod(resolved)]).reshape(resolved), MESH_AXES)


def host_mesh() -> Mesh:
    """fsdp over every device of this process: the layout of one-process tools (conversion,
    checkpoint writes from host arrays)."""
    return make_mesh((1, -1, 1), jax.local_devices())


def _spec_for(shape: tuple[int, ...], logical: PartitionSpec | None, mesh: Mesh) -> PartitionSpec:
    """Logical spec -> mesh spec, replicating any dimension the mesh axes do not divide."""
    if logical is None:
        return PartitionSpec()
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical), LOGICAL_RULES)
    out = []
    for dim, axes in zip(shape, mesh_spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def shardings_for(tree: Any, logical: Any, mesh: Mesh) -> Any:
    """NamedShardings for `tree` (arrays or ShapeDtypeStructs) from its logical specs."""
    return jax.tree_util.tree_map(
        lambda leaf, spec: NamedSharding(mesh, _spec_for(tuple(leaf.shape), spec, mesh)),
        tree, logical, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def param_shardings(config: Any, params: Any, mesh: Mesh) -> Any:
    """Shardings of a LLaVA params tree (or its ShapeDtypeStructs)."""
    from llava_jax.models.llava import logical_axes

    return shardings_for(params, logical_axes(config), mesh)


def adapter_logical_axes(adapter_params: Any, base_logical: Any) -> Any:
    """LoRA `a` [.., in, r] shares its base kernel's input axis, `b` [.., r, out] its output."""
    def walk(node, base):
        if isinstance(node, dict) and set(node) == {"a", "b"}:
            kernel = tuple(base["kernel"])
            return {"a": PartitionSpec(*kernel[:-1], "lora_rank"),
                    "b": PartitionSpec(*kernel[:-2], "lora_rank", kernel[-1])}
        return {k: walk(v, base[k]) for k, v in node.items()}
    return walk(adapter_params, base_logical)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_to_device(batch: Any, mesh: Mesh) -> Any:
    """Process-local host arrays (a dict or any pytree) -> global arrays sharded over (data,
    fsdp) on the batch axis (each process gives its own rows; a dict's "meta" entry, host-side
    records, is left out)."""
    if isinstance(batch, dict):
        batch = {key: value for key, value in batch.items() if key != "meta"}
    return jax.tree_util.tree_map(
        lambda value: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), np.asarray(value)),
        batch)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (batch_to_device's inverse)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def gather_processes(value: np.ndarray) -> np.ndarray:
    """Every process's `value` (host data of one shape everywhere), stacked [process_count, ...]:
    the one cross-process all-gather of host values."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value)).reshape(jax.process_count(), *value.shape)


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (one global shape from per-process widths)."""
    return int(gather_processes(np.asarray(value, np.int64)).max())


def activation_rules() -> Any:
    """Context manager that makes the models' `with_logical_constraint`s use our table."""
    return nn.logical_axis_rules(LOGICAL_RULES)
