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

from llava_jax.files import ConversionError, atomic_output_dir
from llava_jax.heads import init_head
from llava_jax.lora import Adapter, LoraConfig, check_adapter, init_adapter
from llava_jax.models.llava import LlavaConfig, init_params
from llava_jax.trainable import flat_leaves

FORMAT = "llava_jax.model/1"
ADAPTER_FORMAT = "llava_jax.adapter/1"
SAVE_CONCURRENT_GB = 1


def _numpy_to_jax_in_place(tree: dict) -> None:
    """Swaps numpy leaves for jax arrays one at a time, so each numpy copy is freed as we go.

    orbax stages numpy leaves through an extra host copy of the whole tree; jax leaves it
    writes directly, which keeps a 13B conversion near one model copy of host memory.
    """
    for key, value in tree.items():
        if isinstance(value, dict):
            _numpy_to_jax_in_place(value)
        elif isinstance(value, np.ndarray):
            tree[key] = jnp.asarray(value)
            del value


def _save_tree(directory: str, tree: Any) -> None:
    # Bounded concurrency: orbax otherwise stages a copy of every array at once.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)
    ocp.Checkpointer(handler).save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))


def _restore_tree(directory: str, expected: Any, what: str, dtype: Any = None, shardings: Any = None) -> Any:
    """Restores an orbax tree after checking its keys and shapes against `expected`."""
    directory = os.path.abspath(directory)  # orbax needs absolute paths
    if not os.path.isdir(directory):
        raise ConversionError(f"{what}: missing {directory}")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory).item_metadata
    if metadata is None:
        raise ConversionError(f"{directory} is not a complete orbax checkpoint")
    stored, want = flat_leaves(metadata.tree), flat_leaves(expected)
    problems = [f"missing key {k}" for k in sorted(set(want) - set(stored))]
    problems += [f"unexpected key {k}" for k in sorted(set(stored) - set(want))]
    problems += [f"shape mismatch for {k}: config expects {want[k].shape}, checkpoint has {tuple(stored[k].shape)}"
                 for k in sorted(set(want) & set(stored)) if tuple(stored[k].shape) != tuple(want[k].shape)]
    if problems:
        raise ConversionError(f"{what} does not match its config: " + "; ".join(problems[:20]))

    def target(leaf, stored_leaf, sharding):
        out_dtype = jnp.dtype(dtype) if dtype is not None else stored_leaf.dtype
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, out_dtype, sharding=sharding)

    shard_tree = shardings if shardings is not None else jax.tree_util.tree_map(lambda _: None, expected)
    abstract = jax.tree_util.tree_map(target, expected, metadata.tree, shard_tree, is_leaf=lambda x: x is None)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    if shardings is None and jax.process_count() > 1:
        # Every host reads the whole tree into host memory; the caller places its own shards
        # (run_setup.place). A device of one host could neither hold a big base nor be
        # addressed by the other hosts.
        restore_args = jax.tree_util.tree_map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype),
                                              abstract)
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
    """Writes config + params; `extra` (e.g. the HF source) goes into config.json.

    numpy leaves of `params` are replaced in place by jax arrays (same values)."""
    path = os.path.abspath(path)
    _numpy_to_jax_in_place(params)
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


def load_checkpoint(path: str, dtype: Any = None, shardings: Any = None) -> tuple[LlavaConfig, dict]:
    """Reads (config, params). Leaves are jax arrays, cast to `dtype` when given and placed
    with `shardings` (a pytree of jax.sharding.Sharding matching params) when given."""
    config = load_config(path)
    params = _restore_tree(os.path.join(path, "params"), abstract_params(config), f"checkpoint {path}",
                           dtype, shardings)
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


def load_adapter(path: str, name: str, dtype: Any = None) -> tuple[Adapter, dict | None, str | None]:
    """(adapter, head or None, head kind or None) of adapter NAME in checkpoint `path`."""
    directory = os.path.join(path, "adapters", name)
    if not os.path.isdir(directory):
        raise ConversionError(f"checkpoint {path} has no adapter {name!r} (has: {adapter_names(path) or 'none'})")
    return load_adapter_dir(directory, abstract_params(load_config(path)), dtype)


def load_adapter_dir(directory: str, base: Any, dtype: Any = None) -> tuple[Adapter, dict | None, str | None]:
    """An adapter directory (CKPT/adapters/NAME or a LoRA run's workdir/adapter), checked
    against the base it will run over (`base`: params or their abstract shapes)."""
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
    params = _restore_tree(os.path.join(directory, "lora"), expected, what, dtype)
    head = None
    if meta.get("head"):
        hidden = base["llm"]["norm"]["scale"].shape[0]
        head = _restore_tree(os.path.join(directory, "head"), jax.eval_shape(
            lambda: init_head("value", hidden)), f"{what} head", dtype)
    return Adapter(params, lora), head, meta.get("head")
