"""LLaMA / Vicuna decoder (LLaMA-2 and LLaMA-3 style) in Flax Linen.

RMSNorm, rotary embeddings with configurable theta (and LLaMA-3 / linear frequency
scaling), SwiGLU, grouped-query attention, optional tied embeddings. Layers are scanned
(params carry a leading `layers` axis). Batches are LEFT padded: positions follow the
attention mask, so a padded prompt sees the same positions as an unpadded one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.causal_attention import causal_attention
from llava_jax.models.flash_attention import flash_attention
from llava_jax.models.layers import RMSNorm, as_dtype, attention, dense, param_init, scan_layers

ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_BACKENDS = ("xla", "flash")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling only
    rope_high_freq_factor: float = 4.0  # llama3 scaling only
    rope_original_max_position: int = 8192  # llama3 scaling only
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # Runtime knobs (not part of the HF architecture).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # see layers.REMAT_POLICIES
    attention: str = "xla"  # whole-sequence attention: xla (causal_attention.py) | flash (flash_attention.py)
    lora_scale: float = 1.0  # set per adapter by llava_jax.models.lora (alpha / rank)
    lora_dropout: float = 0.0
    # The forms XLA:CPU runs faster (folded query groups in layers.attention, unstacked decode
    # layers in sampling.generate); set from settings' model.cpu_shapes at the run's entry.
    # False: the TPU/GPU forms, on every backend.
    cpu_shapes: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_BACKENDS}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; expected one of {ROPE_TYPES}")


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies, float32, with the configured scaling applied."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        old_len = cfg.rope_original_max_position
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (computed in float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [B, T, H, D] by the half-split convention HF LLaMA weights are stored in."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype: Any = jnp.bfloat16) -> dict:
    """An empty KV cache {k, v}: [layers, batch, kv_heads, length, head_dim]."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", None)  # logical names of a cache array


def unstack_layers(tree: dict, num_layers: int) -> list[dict]:
    """Per-layer trees [layer 0, ...] of a tree whose leaves carry a leading `layers` axis (the
    scanned layers' variables or a stacked cache); see `Llama.hidden(..., layers=...)`."""
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(num_layers)]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left padding: the first real token is position 0 (pads get 0 too; they are masked)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """bool [B, T, T]: query i sees key j when j <= i and j is not padding."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def lm_head_kernel(params: dict, cfg: LlamaConfig) -> tuple[jax.Array, bool]:
    """(LM head weights, tied) as `Llama.logits` uses them: lm_head/kernel [D, V], or the tied
    embedding [V, D]. `params` is the Llama's own subtree."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], True
    return params["lm_head"]["kernel"], False


def dense_kwargs(cfg: LlamaConfig, use_bias: bool = False) -> dict[str, Any]:
    return dict(use_bias=use_bias, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                lora_scale=cfg.lora_scale, lora_dropout=cfg.lora_dropout)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    # Decode only. True: write this token's key/value into the cache, then attend over it; the
    # caller's identical write of new_rows into its per-layer cache (`Llama.hidden` with
    # `layers`) is then the same op, done in place. False (scanned layers, whose cache is a
    # slice of the stacked one): read the cache as it is, the new token joining as extra_kv.
    # Reading the old cache and writing it after would make XLA copy the cache twice a step.
    write_first: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
                 cache: dict | None = None, cache_index: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """With this layer's `cache` ({k, v}: [B, K, S, D]), this call's keys/values are placed
        at slots cache_index.. and queries attend over all S slots (`mask` [B, T, S]); the new
        keys/values are returned for the caller to write into its cache (`Llama.hidden`)."""
        cfg = self.config
        kw = dense_kwargs(cfg)
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = dense(cfg.num_heads * hd, ("embed", "heads"), name="q_proj", **kw)(x)
        k = dense(cfg.num_kv_heads * hd, ("embed", "kv_heads"), name="k_proj", **kw)(x)
        v = dense(cfg.num_kv_heads * hd, ("embed", "kv_heads"), name="v_proj", **kw)(x)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin).transpose(0, 2, 1, 3)  # [B, K, T, D]
        v = v.reshape(b, t, cfg.num_kv_heads, hd).transpose(0, 2, 1, 3)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        new_rows = None
        if cache is None and cfg.attention == "flash":
            out = flash_attention(q, k, v, mask[:, -1])  # the last query row of the mask: key padding
        elif cache is None:  # the mask is causal: tiles above the diagonal are skipped
            out = causal_attention(q, k, v, mask)
        else:
            new_rows = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
            if t == 1 and not self.write_first:  # decode: read the cache as it is; the new token joins as extra_kv
                unwritten = jnp.arange(cache["k"].shape[2])[None, None, :] >= cache_index
                out = attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), mask & ~unwritten,
                                extra_kv=(k, v), fold=cfg.cpu_shapes)
            else:  # prefill (once per generation) or write_first: write the keys/values, then attend
                k, v = (jax.lax.dynamic_update_slice(cache[n], new_rows[n], (0, 0, cache_index, 0)).astype(q.dtype)
                        for n in ("k", "v"))
                out = attention(q, k, v, mask, fold=cfg.cpu_shapes)
        out = out.reshape(b, t, cfg.num_heads * hd)
        return dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out), new_rows


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dense_kwargs(cfg)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(hidden)


class LlamaLayer(nn.Module):
    config: LlamaConfig
    write_first: bool = False  # see LlamaAttention

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache_index, layer_cache):
        # layer_cache: None, or this layer's slice of the KV cache (scanned over layers). Only
        # the new rows leave the scan: carrying the whole cache through it would copy it per layer.
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype))
        attn = LlamaAttention(cfg, self.write_first, name="attn")
        h, new_rows = attn(RMSNorm(name="input_norm", **norm)(x), mask, cos, sin, layer_cache, cache_index)
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(RMSNorm(name="post_attn_norm", **norm)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_rows


class Llama(nn.Module):
    """Decoder-only LM. `__call__` gives float32 logits; `hidden` the final normed states."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=param_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.layers = scan_layers(LlamaLayer, cfg.num_layers, cfg.remat_policy, num_broadcast=4, num_scanned=1)(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", **dense_kwargs(cfg))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def hidden(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict | list | None = None,
               cache_index: jax.Array | int = 0, layers: list[dict] | None = None
               ) -> jax.Array | tuple[jax.Array, dict | list]:
        """Final RMS-normed hidden states [B, T, D] for embedded inputs [B, T, D].

        With a KV `cache` ({k, v} [L, B, K, S, D], see `init_cache`): `attention_mask` is the
        [B, S] validity of the cache slots (this call's T tokens included, at slots
        cache_index..), `positions` are required, and (hidden, updated cache) is returned.

        `layers`: the layers' variables already split per layer (`unstack_layers` of
        {'params': .., 'lora': ..} under llm/layers), with `cache` a matching list of per-layer
        {k, v} [B, K, S, D]. The layers then run unrolled on those arrays instead of scanning
        the stacked params: inside a decode loop, XLA:CPU copies each layer's dynamic slice of
        the stacked weights and cache on every step (a quarter of a CPU decode step), while
        arrays split once before the loop are read in place.
        """
        b, t, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if cache is None:
            mask = causal_padding_mask(attention_mask)
            positions = positions_from_mask(attention_mask) if positions is None else positions
        else:
            if positions is None:
                raise ValueError("decoding with a KV cache needs explicit positions")
            query_slots = cache_index + jnp.arange(t)
            key_slots = jnp.arange(attention_mask.shape[-1])
            mask = (key_slots[None, None, :] <= query_slots[None, :, None]) & attention_mask.astype(bool)[:, None, :]
        cos, sin = rope_cos_sin(self.config, positions, as_dtype(self.config.dtype))
        x = nn.with_logical_constraint(inputs_embeds.astype(as_dtype(self.config.dtype)),
                                       ("batch", "length", "act_embed"))
        index = jnp.asarray(cache_index, jnp.int32)
        if layers is not None:
            if cache is None or len(cache) != len(layers):
                raise ValueError("per-layer `layers` need a matching list of per-layer caches")
            new_cache = []
            for variables, layer_cache in zip(layers, cache):
                # parent=None: a free-standing layer applied to this layer's variables, not a child module.
                layer = LlamaLayer(self.config, write_first=True, parent=None)
                x, rows = layer.apply(variables, x, mask, cos, sin, index, layer_cache)
                new_cache.append({name: jax.lax.dynamic_update_slice(layer_cache[name], rows[name], (0, 0, index, 0))
                                  for name in ("k", "v")})
            return self.norm(x), new_cache
        x, new_rows = self.layers(x, mask, cos, sin, index, cache)
        if cache is None:
            return self.norm(x)
        cache = {name: jax.lax.dynamic_update_slice(cache[name], new_rows[name], (0, 0, 0, index, 0))
                 for name in ("k", "v")}
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(self.embed(input_ids), attention_mask, positions))
