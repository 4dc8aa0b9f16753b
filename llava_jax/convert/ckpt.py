"""Our model checkpoint: a directory with `config.json` (the LlavaConfig) and `params/`
(an orbax PyTree checkpoint). Written atomically; read back checked against the config
so a checkpoint that does not match names the offending key before any device work.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.convert.hf_files import ConversionError, atomic_output_dir
from llava_jax.models.llava import LlavaConfig, init_params

FORMAT = "llava_jax.model/1"
SAVE_CONCURRENT_GB = 1


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


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


def save_checkpoint(path: str, config: LlavaConfig, params: dict, *, overwrite: bool = False,
                    extra: dict[str, Any] | None = None) -> None:
    """Writes config + params; `extra` (e.g. the HF source) goes into config.json.

    numpy leaves of `params` are replaced in place by jax arrays (same values)."""
    path = os.path.abspath(path)
    _numpy_to_jax_in_place(params)
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": FORMAT, "llava": config.to_dict(), **(extra or {})}, f, indent=2)
        # Bounded concurrency: orbax otherwise stages a copy of every array at once,
        # doubling peak host memory during conversion of a 13B model.
        handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)
        ocp.Checkpointer(handler).save(os.path.join(tmp, "params"), args=ocp.args.PyTreeSave(params))


def load_config(path: str) -> LlavaConfig:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConversionError(f"not a llava_jax checkpoint: missing {file}")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{file}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        return LlavaConfig.from_dict(meta["llava"])
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{file}: bad model config: {e}") from None


def load_checkpoint(path: str, dtype: Any = None, shardings: Any = None) -> tuple[LlavaConfig, dict]:
    """Reads (config, params). Leaves are jax arrays, cast to `dtype` when given and placed
    with `shardings` (a pytree of jax.sharding.Sharding matching params) when given."""
    config = load_config(path)
    params_dir = os.path.abspath(os.path.join(path, "params"))  # orbax needs absolute paths
    if not os.path.isdir(params_dir):
        raise ConversionError(f"not a llava_jax checkpoint: missing {params_dir}")
    expected = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(params_dir).item_metadata
    if metadata is None:
        raise ConversionError(f"{params_dir} is not a complete orbax checkpoint")
    stored = _flat(metadata.tree)
    want = _flat(expected)
    problems = [f"missing key {k}" for k in sorted(set(want) - set(stored))]
    problems += [f"unexpected key {k}" for k in sorted(set(stored) - set(want))]
    problems += [f"shape mismatch for {k}: config expects {want[k].shape}, checkpoint has {tuple(stored[k].shape)}"
                 for k in sorted(set(want) & set(stored)) if tuple(stored[k].shape) != want[k].shape]
    if problems:
        raise ConversionError(f"checkpoint {path} does not match its config: " + "; ".join(problems[:20]))

    def target(leaf, stored_leaf, sharding):
        out_dtype = jnp.dtype(dtype) if dtype is not None else stored_leaf.dtype
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, out_dtype, sharding=sharding)

    stored_tree = metadata.tree
    shard_tree = shardings if shardings is not None else jax.tree_util.tree_map(lambda _: None, expected)
    abstract = jax.tree_util.tree_map(target, expected, stored_tree, shard_tree,
                                      is_leaf=lambda x: x is None)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    params = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    config = config.with_runtime(param_dtype=np.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name)
    return config, params
