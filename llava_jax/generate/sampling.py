"""Sampling with a KV cache: one jitted prefill, then a `lax.while_loop` of decode steps.

Prompts are LEFT padded (positions follow the mask). Each step samples from
logits / temperature (greedy when temperature is 0) after top-k / top-p filtering, records
the sampled token's log-probability under log_softmax(logits / temperature) (what PPO
needs, unfiltered), and stops a sequence at EOS or a stop sequence; the loop exits early
once every sequence has stopped. Works over (base, adapter or None) like `lora.forward`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.lora import Adapter, forward
from llava_jax.models.layers import as_dtype
from llava_jax.models.llama import CACHE_AXES, init_cache, positions_from_mask, unstack_layers
from llava_jax.models.llava import LlavaConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample. The fields a run's settings hold (`ppo.response_len`, `temperature`, `top_p`,
    `top_k`, `cache_dtype`) have no defaults here: the PPO rollout's come from the settings tree
    (`rl.setup.sampling_config`, the one place), every other caller states its own (greedy
    decoding: `SamplingConfig.greedy`). Only what no settings field holds has a default."""
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float  # 1: off
    top_k: int  # 0: off
    cache_dtype: str
    eos_id: int | None = 2
    pad_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that also end a response
    # Decode with the layers' weights and KV cache split per layer once, before the loop (see
    # `Llama.hidden`): faster on XLA:CPU, at the cost of one copy of the layer weights (and
    # adapter) while sampling. None: on when the model config's `cpu_shapes` is and that copy
    # is at most UNSTACK_MAX_BYTES (CPU-sized models; a 7B keeps the scanned layers).
    unstack_layers: bool | None = None

    @classmethod
    def greedy(cls, *, max_new_tokens: int, cache_dtype: str, **rest: object) -> SamplingConfig:
        """Greedy decoding (temperature 0: no top-p / top-k filtering to choose)."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, cache_dtype=cache_dtype, **rest)


UNSTACK_MAX_BYTES = 2**30


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Logits outside the top-k and outside the smallest set with mass >= top_p become -inf."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the token that crosses top_p is kept
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample_step(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig,
                suppress: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """(token [B], its log-prob under log_softmax(logits / temperature) [B]). Ids in
    `suppress` are never chosen; the log-prob stays that of the unmodified distribution,
    the one every teacher-forced pass computes."""
    scaled = logits if cfg.temperature == 0 else logits / cfg.temperature
    top = jnp.max(scaled, axis=-1, keepdims=True)
    choose = scaled
    if suppress:
        choose = choose.at[:, jnp.asarray(suppress)].set(jnp.finfo(scaled.dtype).min)
    if cfg.temperature == 0:
        token = jnp.argmax(choose, axis=-1)  # the first maximum
    else:
        token = jax.random.categorical(rng, filter_logits(choose, cfg.top_k, cfg.top_p), axis=-1)
    # log_softmax(scaled)[token] without materialising it over the vocabulary: the same
    # float32 operations as jax.nn.log_softmax, (x - max) - log(sum(exp(x - max))).
    shifted = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - top[:, 0]
    logprob = shifted - jnp.log(jnp.sum(jnp.exp(scaled - jax.lax.stop_gradient(top)), axis=-1))
    return token.astype(jnp.int32), logprob


def placeholder_ids(config: LlavaConfig) -> tuple[int, ...]:
    """Ids a sampler must never emit: the image placeholder when it is a row of the vocabulary
    (HF LLaVA's <image>; the original's -200 is not). Sampled, every later teacher-forced pass
    would read it as an image slot."""
    index = int(config.image_token_index)
    return (index,) if 0 <= index < config.text.vocab_size else ()


def _use_unstacked(config: LlavaConfig, base: dict, adapter: Adapter | None, sampling: SamplingConfig) -> bool:
    if sampling.unstack_layers is not None:
        return sampling.unstack_layers
    trees = [base["llm"]["layers"]] + ([adapter.params] if adapter is not None else [])
    size = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(trees))
    return config.text.cpu_shapes and size <= UNSTACK_MAX_BYTES


def _layer_variables(config: LlavaConfig, base: dict, adapter: Adapter | None) -> list[dict]:
    """The decoder layers' {'params', 'lora'} split per layer (copies, made once per generation)."""
    variables = {"params": base["llm"]["layers"]}
    layers_lora = adapter.params.get("llm", {}).get("layers") if adapter is not None else None
    if layers_lora:
        variables["lora"] = layers_lora
    return unstack_layers(variables, config.text.num_layers)


def _stopped_by_sequence(recent: jax.Array, cfg: SamplingConfig) -> jax.Array:
    hit = jnp.zeros(recent.shape[0], bool)
    for seq in cfg.stop_sequences:
        tail = recent[:, recent.shape[1] - len(seq):]
        hit = hit | jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=-1)
    return hit


def generate(config: LlavaConfig, base: dict, adapter: Adapter | None, input_ids: jax.Array,
             attention_mask: jax.Array, pixel_values: jax.Array | None, rng: jax.Array,
             sampling: SamplingConfig, vision_features: jax.Array | None = None) -> dict[str, jax.Array]:
    """Samples up to `max_new_tokens` per left-padded prompt.

    Returns tokens [B, N] (pad after a stop), mask [B, N] (valid tokens, the stop token
    included), logprobs [B, N] (0 where invalid) and steps (decode steps run). jit it with
    `config` and `sampling` static.
    """
    b, prompt_len = input_ids.shape
    n = sampling.max_new_tokens
    cache = init_cache(config.text, b, prompt_len + n, as_dtype(sampling.cache_dtype))
    cache = {k: nn.with_logical_constraint(v, CACHE_AXES) for k, v in cache.items()}
    kv_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1)
    positions = positions_from_mask(attention_mask)
    hidden, cache = forward(config, base, adapter, input_ids, pixel_values, kv_mask, method="hidden",
                            vision_features=vision_features, positions=positions, cache=cache, cache_index=0)
    logits = forward(config, base, adapter, hidden[:, -1:], method="logits")[:, 0]
    layers = None
    if _use_unstacked(config, base, adapter, sampling):
        layers = _layer_variables(config, base, adapter)
        cache = [{k: nn.with_logical_constraint(v, CACHE_AXES[1:]) for k, v in layer.items()}
                 for layer in unstack_layers(cache, config.text.num_layers)]
    window = max((len(s) for s in sampling.stop_sequences), default=1)
    state = {
        "step": jnp.int32(0), "cache": cache, "logits": logits, "kv_mask": kv_mask,
        "position": positions[:, -1] + 1, "done": jnp.zeros(b, bool), "rng": rng,
        "tokens": jnp.full((b, n), sampling.pad_id, jnp.int32), "logprobs": jnp.zeros((b, n), jnp.float32),
        "mask": jnp.zeros((b, n), bool), "recent": jnp.full((b, window), -1, jnp.int32),
    }

    def keep_going(s):
        return (s["step"] < n) & ~jnp.all(s["done"])

    def decode(s):
        rng, key = jax.random.split(s["rng"])
        token, logprob = sample_step(s["logits"], key, sampling, placeholder_ids(config))
        live = ~s["done"]
        token = jnp.where(live, token, sampling.pad_id)
        step = s["step"]
        recent = jnp.concatenate([s["recent"][:, 1:], token[:, None]], axis=1)
        stop = _stopped_by_sequence(recent, sampling)
        if sampling.eos_id is not None:
            stop = stop | (token == sampling.eos_id)
        kv_mask = jax.lax.dynamic_update_slice(s["kv_mask"], live.astype(jnp.int32)[:, None], (0, prompt_len + step))
        hidden, cache = forward(config, base, adapter, token[:, None], None, kv_mask, method="hidden",
                                positions=s["position"][:, None], cache=s["cache"], cache_index=prompt_len + step,
                                layers=layers)
        return {
            "step": step + 1, "cache": cache, "kv_mask": kv_mask, "position": s["position"] + 1,
            "logits": forward(config, base, adapter, hidden, method="logits")[:, 0],
            "done": s["done"] | stop, "rng": rng, "recent": recent,
            "tokens": s["tokens"].at[:, step].set(token),
            "logprobs": s["logprobs"].at[:, step].set(jnp.where(live, logprob, 0.0)),
            "mask": s["mask"].at[:, step].set(live),
        }

    final = jax.lax.while_loop(keep_going, decode, state)
    return {"tokens": final["tokens"], "mask": final["mask"], "logprobs": final["logprobs"], "steps": final["step"]}


@functools.lru_cache(maxsize=16)
def generate_fn(config: LlavaConfig, sampling: SamplingConfig) -> Any:
    """`generate` jitted for one (config, sampling): f(base, adapter, ids, mask, pixels, rng).
    Cached, so answering several files or models of one config compiles each shape once."""
    def run(base, adapter, input_ids, attention_mask, pixel_values, rng):
        return generate(config, base, adapter, input_ids, attention_mask, pixel_values, rng, sampling)

    return jax.jit(run)
