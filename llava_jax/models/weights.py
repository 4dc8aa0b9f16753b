"""Our model checkpoint format (what training loads and writes; HF formats are in convert/):
a directory with `config.json` (the LlavaConfig), `params/` (an orbax PyTree checkpoint of
the base) and `adapters/NAME/` (`adapter.json` with the LoRA shape and head kind, orbax `lora/` and optional `head/`). Everything is written
atomically and checked against the config on the way back in, so a checkpoint that does
not match names the offending key before any device work.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from llava_jax.files import ConversionError, atomic_output_dir
from llava_jax.models.heads import init_head
from llava_jax.models.lora import Adapter, LoraConfig, check_adapter, init_adapter
from llava_jax.models.llava import LlavaConfig, init_params, logical_axes
from llava_jax.sharding import adapter_logical_axes, host_mesh, param_shardings, replicated, shardings_for
from llava_jax.models.trainable import flat_leaves

FORMAT = "llava_jax.model/1"
ADAPTER_FORMAT = "llava_jax.adapter/1"
SAVE_CONCURRENT_GB = 1


def _numpy_to_shards_in_place(tree: dict, shardings: dict) -> None:
    """Swaps numpy leaves for jax arrays laid out by `shardings`, one leaf at a time, so each
    numpy copy is freed as we go and no device ever holds more than its shard.

    orbax stages numpy leaves through an extra host copy of the whole tree; jax arrays it
    writes shard by shard, which keeps a 13B conversion near one model copy of host memory.
    """
    for key, value in tree.items():
        if isinstance(value, dict):
            _numpy_to_shards_in_place(value, shardings[key])
        elif isinstance(value, np.ndarray):
            tree[key] = jax.device_put(value, shardings[key])
            del value


def _save_tree(directory: str, tree: Any) -> None:
    # Bounded concurrency: orbax otherwise stages a copy of every array at once.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)
    ocp.Checkpointer(handler).save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))


def _restore_tree(directory: str, expected: Any, what: str, dtype: Any = None, shardings: Any = None) -> Any:
    """Restores an orbax tree after checking its keys and shapes against `expected`: into
    `shardings` (each host reads and places only its own shards; casts to `dtype` happen
    shard by shard), or as host numpy arrays when `shardings` is None. Never onto one device."""
    directory = os.path.abspath(directory)  # orbax needs absolute paths
    if not os.path.isdir(directory):
        raise ConversionError(f"{what}: missing {directory}")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(directory).item_metadata
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConversionError(f"{directory} is not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
    if metadata is None:
        raise ConversionError(f"{directory} is not a complete orbax checkpoint")
    stored, want = flat_leaves(metadata.tree), flat_leaves(expected)
    problems = [f"missing key {k}" for k in sorted(set(want) - set(stored))]
    problems += [f"unexpected key {k}" for k in sorted(set(stored) - set(want))]
    problems += [f"shape mismatch for {k}: config expects {want[k].shape}, checkpoint has {tuple(stored[k].shape)}"
                 for k in sorted(set(want) & set(stored)) if tuple(stored[k].shape) != tuple(want[k].shape)]
    if problems:
        raise ConversionError(f"{what} does not match its config: " + "; ".join(problems[:20]))

    def out_dtype(stored_leaf):
        return jnp.dtype(dtype) if dtype is not None else stored_leaf.dtype

    if shardings is None:
        abstract = jax.tree_util.tree_map(lambda leaf, st: jax.ShapeDtypeStruct(leaf.shape, out_dtype(st)),
                                          expected, metadata.tree)
        restore_args = jax.tree_util.tree_map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype),
                                              abstract)
    else:
        abstract = jax.tree_util.tree_map(
            lambda leaf, st, sh: jax.ShapeDtypeStruct(leaf.shape, out_dtype(st), sharding=sh),
            expected, metadata.tree, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))


def _read_json(file: str, fmt: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        raise ConversionError(f"not a llava_jax {what}: missing {file}")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != fmt:
        raise ConversionError(f"{file}: unknown {what} format {meta.get('format')!r}, expected {fmt!r}")
    return meta


def save_checkpoint(path: str, config: LlavaConfig, params: dict, *, overwrite: bool = False,
                    extra: dict[str, Any] | None = None) -> None:
    """Writes config + params; `extra` (e.g. the HF source) goes into config.json. Jax leaves
    are written from their shards; numpy leaves of `params` are replaced in place by jax
    arrays (same values) sharded over this host's devices by the model's logical axes."""
    path = os.path.abspath(path)
    if any(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params)):
        _numpy_to_shards_in_place(params, param_shardings(config, params, host_mesh()))
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": FORMAT, "llava": config.to_dict(), **(extra or {})}, f, indent=2)
        _save_tree(os.path.join(tmp, "params"), params)


def load_config(path: str) -> LlavaConfig:
    file = os.path.join(path, "config.json")
    meta = _read_json(file, FORMAT, "checkpoint")
    try:
        return LlavaConfig.from_dict(meta["llava"])
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{file}: bad model config: {e}") from None


def abstract_params(config: LlavaConfig) -> Any:
    """ShapeDtypeStructs of the params tree (no memory, no compute)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def load_checkpoint(path: str, dtype: Any = None, mesh: Mesh | None = None) -> tuple[LlavaConfig, dict]:
    """Reads (config, params), cast to `dtype` when given. With `mesh`, leaves are jax arrays
    restored straight into their shards (the model's logical axes over `mesh`, on one host as
    on many); without, host numpy arrays."""
    config = load_config(path)
    abstract = abstract_params(config)
    shardings = None if mesh is None else param_shardings(config, abstract, mesh)
    params = _restore_tree(os.path.join(path, "params"), abstract, f"checkpoint {path}", dtype, shardings)
    config = config.with_runtime(param_dtype=np.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name)
    return config, params


def adapter_names(path: str) -> list[str]:
    root = os.path.join(path, "adapters")
    return sorted(d for d in os.listdir(root) if ".partial-" not in d) if os.path.isdir(root) else []


def write_adapter_dir(directory: str, adapter: Adapter, head: dict | None = None, head_kind: str | None = None,
                      *, overwrite: bool = False, extra: dict[str, Any] | None = None) -> None:
    """One adapter directory (`adapter.json`, orbax `lora/`, optional `head/`), atomically:
    the layout of CKPT/adapters/NAME and of a LoRA training run's `workdir/adapter`."""
    if (head is None) != (head_kind is None):
        raise ConversionError(f"{directory}: a head needs its kind (reward or value) and vice versa")
    with atomic_output_dir(os.path.abspath(directory), overwrite=overwrite) as tmp:
        meta = {"format": ADAPTER_FORMAT, "lora": dataclasses.asdict(adapter.config), "head": head_kind}
        with open(os.path.join(tmp, "adapter.json"), "w") as f:
            json.dump({**meta, **(extra or {})}, f, indent=2)
        _save_tree(os.path.join(tmp, "lora"), adapter.params)
        if head is not None:
            _save_tree(os.path.join(tmp, "head"), head)


def save_adapter(path: str, name: str, adapter: Adapter, head: dict | None = None, head_kind: str | None = None,
                 *, overwrite: bool = False, extra: dict[str, Any] | None = None) -> None:
    """Adds adapter NAME (+ optional reward/value head) to checkpoint `path`, checked against its base."""
    try:
        check_adapter(abstract_params(load_config(path)), adapter, name)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    os.makedirs(os.path.join(path, "adapters"), exist_ok=True)
    write_adapter_dir(os.path.join(path, "adapters", name), adapter, head, head_kind, overwrite=overwrite, extra=extra)


def load_adapter(path: str, name: str, dtype: Any = None, mesh: Mesh | None = None
                 ) -> tuple[Adapter, dict | None, str | None]:
    """(adapter, head or None, head kind or None) of adapter NAME in checkpoint `path`."""
    directory = os.path.join(path, "adapters", name)
    if not os.path.isdir(directory):
        raise ConversionError(f"checkpoint {path} has no adapter {name!r} (has: {adapter_names(path) or 'none'})")
    config = load_config(path)
    return load_adapter_dir(directory, abstract_params(config), dtype, mesh=mesh, config=config)


def load_adapter_dir(directory: str, base: Any, dtype: Any = None, *, mesh: Mesh | None = None,
                     config: LlavaConfig | None = None) -> tuple[Adapter, dict | None, str | None]:
    """An adapter directory (CKPT/adapters/NAME or a LoRA run's workdir/adapter), checked
    against the base it will run over (`base`: params or their abstract shapes). With `mesh`
    (and the base's `config`), restored into the shardings of the layers it adapts (heads
    replicated); without, host numpy arrays."""
    if mesh is not None and config is None:
        raise ValueError("load_adapter_dir: a mesh needs the base's config (its logical axes)")
    if not os.path.isdir(directory):
        raise ConversionError(f"adapter directory {directory} does not exist")
    meta = _read_json(os.path.join(directory, "adapter.json"), ADAPTER_FORMAT, "adapter")
    lora = LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"]),
                         "projector": tuple(meta["lora"]["projector"])})
    what = f"adapter {directory}"
    try:
        expected = jax.eval_shape(lambda: init_adapter(base, lora, jax.random.PRNGKey(0)).params)
    except ValueError as e:
        raise ConversionError(f"{what} does not fit its base: {e}") from None
    lora_sh = head_sh = None
    if mesh is not None:
        lora_sh = shardings_for(expected, adapter_logical_axes(expected, logical_axes(config)), mesh)
    params = _restore_tree(os.path.join(directory, "lora"), expected, what, dtype, lora_sh)
    head = None
    if meta.get("head"):
        hidden = base["llm"]["norm"]["scale"].shape[0]
        head_shape = jax.eval_shape(lambda: init_head("value", hidden))
        if mesh is not None:
            head_sh = jax.tree_util.tree_map(lambda _: replicated(mesh), head_shape)
        head = _restore_tree(os.path.join(directory, "head"), head_shape, f"{what} head", dtype, head_sh)
    return Adapter(params, lora), head, meta.get("head")
