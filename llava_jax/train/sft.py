"""Supervised fine-tuning (and stage-1 pretraining): next-token cross-entropy on assistant
tokens. `sft_step` is pure: (state, frozen base, batch) -> (state, metrics).

The loss is the mean over every target token of the global batch (micro-batches
accumulated by summing, then dividing by the token count), so it does not depend on how
the batch is split across devices or accumulation steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llava_jax.models import lora as lora_lib
from llava_jax.train.losses import head_cross_entropy
from llava_jax.models.layers import as_dtype
from llava_jax.models.llama import lm_head_kernel
from llava_jax.train.state import ModelSpec, TrainState, accumulate, apply_gradients, assemble


def sft_loss_sums(spec: ModelSpec, params: dict, frozen: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    base, adapter, _ = assemble(spec, params, frozen)
    rngs = {"dropout": rng} if spec.lora is not None and spec.lora.dropout > 0 else None
    hidden = lora_lib.forward(spec.config, base, adapter, batch["input_ids"], batch["pixel_values"],
                              batch["attention_mask"], method="hidden", rngs=rngs)
    kernel, tied = lm_head_kernel(base["llm"], spec.config.text)
    # Same sums as token_cross_entropy on the logits, without the logits of non-target positions.
    ce, tokens, correct = head_cross_entropy(hidden, kernel, batch["labels"], batch["valid"], tied=tied,
                                             dtype=as_dtype(spec.config.text.dtype))
    return ce, {"ce_sum": ce, "tokens": tokens, "correct": correct}


def sft_step(spec: ModelSpec, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
             state: TrainState, frozen: dict, batch: dict, grad_accum: int = 1) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    loss_fn = lambda p, mb, key: sft_loss_sums(spec, p, frozen, mb, key)  # noqa: E731
    grads, aux = accumulate(loss_fn, state.params, batch, grad_accum, step_rng)
    tokens = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / tokens, grads)
    new_state, grad_norm = apply_gradients(state, grads, optimizer, rng)
    metrics = {"loss": aux["ce_sum"] / tokens, "token_accuracy": aux["correct"] / tokens,
               "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": aux["tokens"]}
    return new_state, metrics
