"""LoRA adapters: small pytrees over one frozen base.

An adapter's tree has the paths of the layers it adapts (`llm/layers/attn/q_proj`, ...),
each holding `a` [(layers,) in, r] and `b` [(layers,) r, out]; it reaches the model as
the `lora` variable collection, so `forward(config, base, None, ...)` is the base model and
`policy`, `ref_policy`, `value` and `reward` adapters all run over the same base arrays.
`b` starts at zero: a fresh adapter reproduces the base exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.llava import Llava, LlavaConfig
from llava_jax.models.trainable import flat_leaves

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTOR_TARGETS = ("linear_1", "linear_2")
# Where each LLM target lives under llm/layers.
_LLM_PARENT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LLM_TARGETS  # any of LLM_TARGETS (or their short names q, k, ...)
    projector: tuple[str, ...] = ()  # projector layers to adapt too: linear_1 and/or linear_2

    def __post_init__(self):
        targets = tuple(SHORT_NAMES.get(t, t) for t in self.targets)
        unknown = sorted(set(targets) - set(LLM_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target modules {unknown}; expected any of {LLM_TARGETS}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        object.__setattr__(self, "targets", targets)
        bad = sorted(set(self.projector) - set(PROJECTOR_TARGETS))
        if bad:
            raise ValueError(f"unknown projector LoRA targets {bad}; expected any of {PROJECTOR_TARGETS}")
        object.__setattr__(self, "projector", tuple(self.projector))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@flax.struct.dataclass
class Adapter:
    """An adapter's weights plus its (static) shape and scale."""

    params: dict
    config: LoraConfig = flax.struct.field(pytree_node=False)


def target_paths(base: dict, lora: LoraConfig) -> list[tuple[str, ...]]:
    """Paths of the layers the adapter covers; a target missing from the base is an error."""
    paths = [("llm", "layers", _LLM_PARENT[t], t) for t in lora.targets]
    paths += [("projector", t) for t in lora.projector]
    for path in paths:
        node = base
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"LoRA target {'/'.join(path)} is not a layer of the base model")
            node = node[key]
    return paths


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_adapter(base: dict, lora: LoraConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Adapter:
    """A fresh adapter: `a` uniform in +-1/sqrt(in) (PEFT's default init), `b` zero."""
    params: dict = {}
    for i, path in enumerate(target_paths(base, lora)):
        kernel = _get(base, path)["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, fan_in, lora.rank), dtype, -bound, bound)
        _set(params, path, {"a": a, "b": jnp.zeros((*lead, lora.rank, fan_out), dtype)})
    return Adapter(params, lora)


def adapted_config(config: LlavaConfig, adapter: Adapter | None) -> LlavaConfig:
    """The model config that applies `adapter`'s scale and dropout (a static per-adapter knob)."""
    if adapter is None:
        return config
    text = dataclasses.replace(config.text, lora_scale=adapter.config.scale, lora_dropout=adapter.config.dropout)
    return dataclasses.replace(config, text=text)


def forward(config: LlavaConfig, base: dict, adapter: Adapter | None, *args: Any,
            method: str | Callable | None = None, rngs: dict | None = None, **kwargs: Any) -> Any:
    """`Llava(...).apply` over (base, adapter or None): logits by default, or any Llava method
    (`"hidden"`, `"vision_features"`, ...). Pass `rngs={'dropout': key}` for LoRA dropout."""
    variables = {"params": base}
    if adapter is not None:
        variables["lora"] = adapter.params
    model = Llava(adapted_config(config, adapter))
    if isinstance(method, str):
        method = getattr(Llava, method)
    return model.apply(variables, *args, method=method, rngs=rngs, **kwargs)


def merge(base: dict, adapter: Adapter) -> dict:
    """W + scale * a @ b for every adapted layer (computed in float32, stored in W's dtype)."""
    merged = jax.tree_util.tree_map(lambda x: x, base)  # new containers, shared leaves
    for path in target_paths(base, adapter.config):
        layer = _get(adapter.params, path)
        kernel = _get(base, path)["kernel"]
        delta = jnp.matmul(layer["a"].astype(jnp.float32), layer["b"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        new = (kernel.astype(jnp.float32) + adapter.config.scale * delta).astype(kernel.dtype)
        _set(merged, path + ("kernel",), new)
    return merged


def merge_in_shards(base: dict, adapter: Adapter) -> dict:
    """`merge` of a base laid out over a mesh (jax arrays), jitted so that each merged kernel is
    computed and kept in its base kernel's shards: no device ever holds a whole layer stack."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, base)
    return jax.jit(merge, out_shardings=shardings)(base, adapter)


def check_adapter(base: dict, adapter: Adapter, name: str = "adapter") -> None:
    """Rank, targets and shapes of `adapter` against `base`; one clear error per mismatch."""
    expected = {path for path in target_paths(base, adapter.config)}
    found = {tuple(p.split("/")[:-1]) for p in flat_leaves(adapter.params)}
    for path in sorted(found - expected):
        raise ValueError(f"{name}: adapts {'/'.join(path)}, which its config does not target or the base lacks")
    for path in sorted(expected - found):
        raise ValueError(f"{name}: no weights for target {'/'.join(path)}")
    for path in sorted(expected):
        *lead, fan_in, fan_out = _get(base, path)["kernel"].shape
        layer = _get(adapter.params, path)
        want = {"a": (*lead, fan_in, adapter.config.rank), "b": (*lead, adapter.config.rank, fan_out)}
        for key, shape in want.items():
            if tuple(layer[key].shape) != shape:
                raise ValueError(f"{name}: {'/'.join(path)}/{key} has shape {tuple(layer[key].shape)}, "
                                 f"expected {shape} (rank {adapter.config.rank} over the base layer)")
