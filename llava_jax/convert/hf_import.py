"""HF directory -> (LlavaConfig, params): the three layouts `load_hf` accepts.

(a) llava-hf `LlavaForConditionalGeneration`; (b) the original LLaVA
`LlavaLlamaForCausalLM` (+ a CLIP directory unless the tower is inside the checkpoint);
(c) a plain `LlamaForCausalLM` + a CLIP directory, with a freshly initialised projector
(the start of stage-1 training). Tensors are read one at a time and written into
preallocated arrays of the target dtype, so peak host memory stays near one model copy.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.convert import hf_config, hf_keys
from llava_jax.convert.hf_files import ConversionError, TensorSource
from llava_jax.models.llava import Llava, LlavaConfig, init_params

MAX_LISTED = 20  # names listed in an error before "... and N more"


def _listing(names: list[str]) -> str:
    more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


class _ParamFiller:
    """Preallocated params tree of the expected shapes, filled tensor by tensor."""

    def __init__(self, config: LlavaConfig, dtype: Any):
        abstract = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
        self.dtype = np.dtype(jnp.dtype(dtype))
        self.shapes = {tuple(k.key for k in path): leaf.shape
                       for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        self.arrays: dict[tuple[str, ...], np.ndarray] = {}
        self.filled: set[tuple[tuple[str, ...], int | None]] = set()
        self.unknown: list[str] = []

    def put(self, source_name: str, canonical: str, tensor_fn) -> None:
        found = hf_keys.lookup(canonical)
        if found is None or found[0].path not in self.shapes:
            self.unknown.append(source_name)
            return
        entry, layer = found
        full = self.shapes[entry.path]
        expected = full[1:] if entry.stacked else full
        if entry.stacked and not 0 <= layer < full[0]:
            self.unknown.append(source_name)
            return
        value = hf_keys.to_ours(tensor_fn(), entry.layout)
        if value.shape != expected:
            hf_expected = hf_keys.to_hf(np.empty(expected, np.bool_), entry.layout).shape
            raise ConversionError(f"shape mismatch for {source_name}: expected {hf_expected}, "
                                  f"found {tuple(hf_keys.to_hf(value, entry.layout).shape)}")
        if (entry.path, layer) in self.filled:
            raise ConversionError(f"tensor {source_name} given twice")
        target = self.arrays.get(entry.path)
        if target is None:
            target = self.arrays[entry.path] = np.empty(full, self.dtype)
        if entry.stacked:
            target[layer] = value
        else:
            target[...] = value
        self.filled.add((entry.path, layer))

    def missing(self, skip_prefix: tuple[str, ...] = ()) -> list[str]:
        out = []
        for path, shape in self.shapes.items():
            if skip_prefix and path[:len(skip_prefix)] == skip_prefix:
                continue
            entry = hf_keys.PARAM_TABLE[hf_keys.BY_PATH[path]]
            for layer in (range(shape[0]) if entry.stacked else [None]):
                if (path, layer) not in self.filled:
                    out.append(hf_keys.hf_name(path, layer))
        return out

    def tree(self) -> dict:
        tree: dict = {}
        for path, array in self.arrays.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = array
        return tree


def _read_into(filler: _ParamFiller, directory: str, layout: str) -> None:
    with TensorSource(directory) as source:
        for name in source.keys():
            canonical = hf_keys.canonical_name(name, layout)
            if canonical is not None:
                filler.put(name, canonical, lambda n=name: source.get(n))
    if filler.unknown:
        raise ConversionError(f"unknown keys in {directory}: {_listing(sorted(filler.unknown))}")


def _vision_dir(hf: dict[str, Any], given: str | None, directory: str) -> str:
    if given:
        if not os.path.isdir(given):
            raise ConversionError(f"vision tower directory {given} does not exist")
        return given
    named = hf.get("mm_vision_tower")
    if named and os.path.isdir(named):
        return named
    raise ConversionError(
        f"{directory} needs a CLIP vision tower and its config names {named!r}, which is not a local "
        "directory; pass --vision-tower DIR (a CLIP model directory)")


def load_hf(path: str, dtype: Any = jnp.float32, vision_tower: str | None = None,
            seed: int = 0) -> tuple[LlavaConfig, dict]:
    """Reads an HF checkpoint directory into (config, params) with numpy leaves of `dtype`.

    `vision_tower` is a CLIP directory, needed for the original LLaVA layout (unless the
    tower is inside the checkpoint) and for a plain LLaMA; `seed` initialises a fresh
    projector for the plain-LLaMA case.
    """
    if not os.path.isdir(path):
        raise ConversionError(f"HF directory {path} does not exist")
    hf = hf_config.read_config(path)
    layout = hf_config.detect_layout(hf, path)
    act = "gelu"
    if layout == "llava_hf":
        config, act = hf_config.llava_config_from_hf(hf)
        if vision_tower:
            raise ConversionError("--vision-tower is only for the original LLaVA and plain LLaMA layouts")
    else:
        vdir = _vision_dir(hf, vision_tower, path)
        vision_cfg = hf_config.vision_config_from_hf(hf_config.read_config(vdir))
        with TensorSource(path) as source:
            # LLaVA v1 checkpoints may carry the tower; then the CLIP dir gives only its config.
            tower_inside = any(k.startswith("model.vision_tower.") for k in source.keys())
        if layout == "llava_original":
            config = hf_config.original_llava_config(hf, vision_cfg)
        else:
            config = hf_config.new_llava_config(hf_config.text_config_from_hf(hf), vision_cfg, "linear")
    config = config.with_runtime(dtype=_dtype_name(dtype), param_dtype=_dtype_name(dtype))

    if act == "linear":  # llava-hf written by us from a one-Linear projector; see _collapse_identity
        config = dataclasses.replace(config, projector_type="mlp2x_gelu")
    filler = _ParamFiller(config, dtype)
    _read_into(filler, path, layout)
    if layout != "llava_hf" and not tower_inside:
        _read_into(filler, vdir, "clip")
    fresh_projector = layout == "llama"
    missing = filler.missing(skip_prefix=("projector",) if fresh_projector else ())
    if missing:
        raise ConversionError(f"missing keys in {path}: {_listing(missing)}")
    params = filler.tree()
    if fresh_projector:
        params["projector"] = jax.tree_util.tree_map(lambda x: np.asarray(x, filler.dtype),
                                                     _fresh_projector(config, seed))
    if act == "linear":
        config, params = _collapse_identity(config, params, path)
    return config, params


def _fresh_projector(config: LlavaConfig, seed: int) -> dict:
    """`init_params(config, PRNGKey(seed))["projector"]` (same values), initialising only the
    projector: a full init would materialise a whole random float32 LLM (~28 GB for 7B)."""
    features = jnp.zeros((1, 1, config.vision.hidden_size), jnp.float32)
    variables = Llava(config).init(jax.random.PRNGKey(seed), features, method=lambda m, x: m.projector(x))
    return nn.meta.unbox(variables["params"])["projector"]


def _collapse_identity(config: LlavaConfig, params: dict, path: str) -> tuple[LlavaConfig, dict]:
    """A llava-hf projector with identity activation must have linear_2 = I, b = 0 (how a
    one-Linear projector is exported); it becomes a `linear` projector again."""
    second = params["projector"]["linear_2"]
    eye = np.eye(second["kernel"].shape[0], dtype=second["kernel"].dtype)
    if not (np.array_equal(second["kernel"], eye) and not np.any(second["bias"])):
        raise ConversionError(f"{path}: projector_hidden_act 'linear' with a non-identity linear_2 is not supported")
    params["projector"] = {"linear_1": params["projector"]["linear_1"]}
    return dataclasses.replace(config, projector_type="linear"), params
