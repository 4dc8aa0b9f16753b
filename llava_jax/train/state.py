"""What a training step carries: the trainable tree, optimiser state, step and RNG, plus
the static `ModelSpec` that says how (trainable, frozen base) become a model.

The trainable tree holds any of `base` (parts of the base params, e.g. the projector or
the whole LLM), `adapter` (LoRA) and `head` (reward / value); the frozen rest of the base
is a separate argument of every step and is never differentiated, so optimiser state
exists only for trainable leaves.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaConfig
from llava_jax.models.trainable import join_base


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    config: LlavaConfig
    lora: lora_lib.LoraConfig | None = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"base"?: partial base, "adapter"?: LoRA tree, "head"?: head tree}
    opt_state: Any
    rng: jax.Array


def assemble(spec: ModelSpec, params: dict, frozen: dict) -> tuple[dict, lora_lib.Adapter | None, dict | None]:
    """(base, adapter or None, head or None) from the trainable tree and the frozen base."""
    base = join_base(params["base"], frozen) if "base" in params else frozen
    adapter = lora_lib.Adapter(params["adapter"], spec.lora) if "adapter" in params else None
    return base, adapter, params.get("head")


def create_state(params: dict, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def apply_gradients(state: TrainState, grads: dict, optimizer: optax.GradientTransformation,
                    rng: jax.Array) -> tuple[TrainState, jax.Array]:
    """One optimiser update; returns the new state and the (pre-clipping) global grad norm."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, optax.global_norm(grads)


def split_microbatches(batch: dict, accum: int) -> dict:
    """[accum * micro, ...] -> [accum, micro, ...] for every array (a scan over accumulation)."""
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accum} micro-batches")
        return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
    return jax.tree_util.tree_map(split, batch)


def accumulate(loss_fn, params: dict, batch: dict, accum: int, rng: jax.Array) -> tuple[dict, dict]:
    """Sums `loss_fn(params, micro, rng) -> (summed loss, aux sums)` and its gradient over
    micro-batches; the caller normalises (exact token- or pair-weighted means)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum == 1:
        grads, aux = grad_fn(params, batch, rng)
        return grads, aux
    micro = split_microbatches(batch, accum)

    def body(carry, xs):
        grads_sum, aux_sum = carry
        mb, key = xs
        grads, aux = grad_fn(params, mb, key)
        return (jax.tree_util.tree_map(jnp.add, grads_sum, grads), jax.tree_util.tree_map(jnp.add, aux_sum, aux)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda: grad_fn(params, first, rng)[1])
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
             jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
    (grads, aux), _ = jax.lax.scan(body, zeros, (micro, jax.random.split(rng, accum)))
    return grads, aux
