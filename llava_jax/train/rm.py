"""Reward model: pairwise loss with LLaVA-RLHF's centring term. `rm_step` is pure.

For scores r0 (output_1) and r1 (output_2) and choice c (1 when output_2 is preferred):
loss = BCE-with-logits(r1 - r0, c) + centering * |mean(r0 + r1)|, accuracy = mean((r1 - r0
>= 0) == c). Both sequences of a pair share one image: the frozen vision tower runs once
per pair.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llava_jax.models import heads, lora as lora_lib
from llava_jax.train.state import ModelSpec, TrainState, apply_gradients, assemble


def pair_scores(spec: ModelSpec, params: dict, frozen: dict, batch: dict, rng: jax.Array | None = None) -> jax.Array:
    """Rewards [B, 2] of both sides of each pair (input_ids [B, 2, T])."""
    base, adapter, head = assemble(spec, params, frozen)
    b, two, t = batch["input_ids"].shape
    vision = lora_lib.forward(spec.config, base, None, batch["pixel_values"], method="vision_features")
    vision = jnp.repeat(vision, two, axis=0)
    ids = batch["input_ids"].reshape(b * two, t)
    mask = batch["attention_mask"].reshape(b * two, t)
    rngs = {"dropout": rng} if rng is not None and spec.lora is not None and spec.lora.dropout > 0 else None
    hidden = lora_lib.forward(spec.config, base, adapter, ids, None, mask, method="hidden",
                              vision_features=vision, rngs=rngs)
    return heads.reward_scores(head, hidden, mask).reshape(b, two)


def pairwise_loss(scores: jax.Array, choice: jax.Array, valid: jax.Array, centering: float) -> tuple[jax.Array, dict]:
    weights = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    margin = scores[:, 1] - scores[:, 0]
    target = choice.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(margin, target)
    center = jnp.abs(jnp.sum((scores[:, 0] + scores[:, 1]) * weights) / count)
    loss = jnp.sum(bce * weights) / count + centering * center
    accuracy = jnp.sum(((margin >= 0) == (target > 0.5)) * weights) / count
    return loss, {"loss": loss, "accuracy": accuracy, "center": center,
                  "reward_mean": jnp.sum((scores[:, 0] + scores[:, 1]) * weights) / (2 * count)}


def rm_step(spec: ModelSpec, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
            state: TrainState, frozen: dict, batch: dict, centering: float = 1e-3) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)

    def loss_fn(params):
        return pairwise_loss(pair_scores(spec, params, frozen, batch, step_rng), batch["choice"], batch["valid"],
                             centering)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state, grad_norm = apply_gradients(state, grads, optimizer, rng)
    return new_state, {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step)}


def rm_eval(spec: ModelSpec, params: dict, frozen: dict, batch: dict, centering: float = 1e-3) -> dict:
    return pairwise_loss(pair_scores(spec, params, frozen, batch), batch["choice"], batch["valid"], centering)[1]
