"""Splitting what trains from what stays frozen, so optimiser state exists only for the
trainable leaves (adapters, heads, optionally parts of the base such as the projector).

A base tree is cut at named subtrees (`"projector"`, `"llm"`, `"llm/layers"`, ...): the
trainable part and the frozen part are two trees with disjoint leaves that `join_base`
puts back together. The frozen part can stay bfloat16 while trainable leaves are float32.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def _paths(names: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(name.split("/")) for name in names]


def split_base(base: dict, trainable: Sequence[str]) -> tuple[dict, dict]:
    """(trainable subtrees, the rest). An unknown name is an error, not an empty set."""
    train: dict = {}
    frozen = dict(base)
    for path in _paths(trainable):
        src, dst_train, dst_frozen = base, train, frozen
        for i, key in enumerate(path):
            if not isinstance(src, dict) or key not in src:
                raise ValueError(f"trainable part {'/'.join(path)!r} is not in the base params")
            if i == len(path) - 1:
                dst_train[key] = src[key]
                del dst_frozen[key]
            else:
                src = src[key]
                dst_train = dst_train.setdefault(key, {})
                dst_frozen[key] = dict(dst_frozen[key])
                dst_frozen = dst_frozen[key]
    return train, frozen


def join_base(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split_base`."""
    out = dict(frozen)
    for key, value in trainable.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = join_base(value, out[key])
        else:
            out[key] = value
    return out


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Floating leaves to `dtype` (e.g. float32 master weights for trainable leaves)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def flat_leaves(tree: Any) -> dict[str, Any]:
    """'a/b/c' path -> leaf (for checks, logs, tests and error messages)."""
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_paths(tree: Any) -> list[str]:
    """'a/b/c' path of every leaf."""
    return list(flat_leaves(tree))
