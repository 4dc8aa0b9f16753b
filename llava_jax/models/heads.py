"""Reward and value heads: each a small tree {kernel [D, 1], bias [1]} read off the LLM's
final normed hidden states (`Llava.hidden`).

The reward head scores a sequence at its last non-pad token (works for left and right
padding); the value head scores every token. LLaVA-RLHF starts the reward head with a
zero bias and the value head entirely at zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HEAD_KINDS = ("reward", "value")


def init_head(kind: str, hidden_size: int, rng: jax.Array | None = None) -> dict:
    """`reward`: kernel like torch's Linear default (uniform +-1/sqrt(D)), bias 0; `value`: zeros."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")
    if kind == "value":
        kernel = jnp.zeros((hidden_size, 1), jnp.float32)
    else:
        if rng is None:
            raise ValueError("a reward head needs an rng to initialise its kernel")
        bound = 1.0 / np.sqrt(hidden_size)
        kernel = jax.random.uniform(rng, (hidden_size, 1), jnp.float32, -bound, bound)
    return {"kernel": kernel, "bias": jnp.zeros((1,), jnp.float32)}


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last non-pad token per row [B] (left or right padding)."""
    positions = jnp.arange(attention_mask.shape[-1])
    return jnp.max(jnp.where(attention_mask.astype(bool), positions, -1), axis=-1)


def apply_head(head: dict, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> score [...] in float32."""
    out = jnp.dot(hidden.astype(jnp.float32), head["kernel"].astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
    return out[..., 0] + head["bias"].astype(jnp.float32)[0]


def reward_scores(head: dict, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Scalar reward per sequence [B], read at the last non-pad position."""
    last = last_token_index(attention_mask)
    at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return apply_head(head, at_last)


def token_values(head: dict, hidden: jax.Array) -> jax.Array:
    """Per-token values [B, T]."""
    return apply_head(head, hidden)
