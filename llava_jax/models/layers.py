"""Building blocks shared by the CLIP and LLaMA models.

Every parameter is created through `param_init`, which attaches logical axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `layers`, ...) so the sharding rules can
place it without knowing which model it belongs to.

The one form XLA:CPU runs faster, the query group folded into 4-D dots in `attention`, is a
static argument (`fold`) that the models pass from their config's `cpu_shapes` field (settings
`model.cpu_shapes`, decided once at the run's entry); without it every backend gets the plain
form, the TPU/GPU code.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Remat policies for the scanned layer body; "none" keeps every activation.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def as_dtype(name: str) -> Any:
    """Maps a config dtype string to a JAX dtype, with a clear error for typos."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def param_init(init: Callable, axes: Sequence[str | None]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
    """Linear layer, kernel [in, out] named by `axes`, with an optional LoRA path.

    LoRA weights are not params: they come in the separate `lora` collection
    (`a` [in, r], `b` [r, out]; see llava_jax/models/lora.py). Without that collection the layer
    is the plain base layer, so one base serves every adapter and none.
    """

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    std: float = 0.02
    lora_scale: float = 1.0  # alpha / rank of the adapter applied, if any
    lora_dropout: float = 0.0  # applied only when a 'dropout' rng is given

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", param_init(nn.initializers.normal(self.std), self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", param_init(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a").astype(self.dtype)
            b = self.get_variable("lora", "b").astype(self.dtype)
            if self.lora_dropout > 0 and self.has_rng("dropout"):
                x = nn.Dropout(self.lora_dropout, deterministic=False)(x)
            y = y + jnp.dot(jnp.dot(x, a), b) * jnp.asarray(self.lora_scale, self.dtype)
        return y


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool, dtype: Any,
          param_dtype: Any, name: str, std: float = 0.02, lora_scale: float = 1.0,
          lora_dropout: float = 0.0) -> Dense:
    """A `Dense` (HF stores [out, in]; convert transposes)."""
    return Dense(features, axes, use_bias, dtype, param_dtype, std, lora_scale, lora_dropout, name=name)


def layer_norm(eps: float, dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[x^2]-E[x]^2 loses digits against torch's two-pass variance.
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=param_init(nn.initializers.ones, ("norm",)),
        bias_init=param_init(nn.initializers.zeros, ("norm",)), name=name)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (HF's order of casts)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", param_init(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              extra_kv: tuple[jax.Array, jax.Array] | None = None, fold: bool = False) -> jax.Array:
    """Softmax attention with grouped-query heads.

    q: [B, T, H, D]; k, v: [B, K, S, D] (heads before positions: a decode step then reads
    the cache without transposing it) with H % K == 0; mask: bool [B, T, S] or None.
    `extra_kv` ([B, K, T, D] each) are T more keys/values every query sees (the current
    decode token), so a step never has to copy the cache to insert them first.
    Softmax runs in float32; fully masked rows (left-pad queries) stay finite. `fold` (the
    model's `cpu_shapes`): the query group folded into the query axis, 4-D dots, which XLA:CPU
    runs 1.6-2x faster than the 5-D ones (CLIP's attention, and decode with grouped KV heads).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    groups = h // kv_heads
    q = q.reshape(b, t, kv_heads, groups, d) * jnp.asarray(1.0 / np.sqrt(d), q.dtype)  # the small operand
    if fold:
        q = q.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * t, d)

    def scores(keys: jax.Array) -> jax.Array:
        if not fold:
            return jnp.einsum("btkgd,bksd->bkgts", q, keys).astype(jnp.float32)
        out = jnp.einsum("bkqd,bksd->bkqs", q, keys).astype(jnp.float32)
        return out.reshape(b, kv_heads, groups, t, keys.shape[2])

    logits = scores(k)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    if extra_kv is not None:
        logits = jnp.concatenate([logits, scores(extra_kv[0])], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    s = k.shape[2]

    def mix(p: jax.Array, values: jax.Array) -> jax.Array:
        if not fold:
            return jnp.einsum("bkgts,bksd->btkgd", p, values)
        out = jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, kv_heads, groups * t, -1), values)
        return out.reshape(b, kv_heads, groups, t, d).transpose(0, 3, 1, 2, 4)

    out = mix(probs[..., :s], v)
    if extra_kv is not None:
        out = out + mix(probs[..., s:], extra_kv[1])
    return out.reshape(b, t, h, d)


def scan_layers(layer_cls: type[nn.Module], num_layers: int, remat_policy: str,
                num_broadcast: int, num_scanned: int = 0) -> type[nn.Module]:
    """Wraps a layer `(carry, *broadcast_args, *per_layer_args) -> (carry, out)` in remat + nn.scan.

    Params get a leading `layers` axis, so compile time does not grow with depth.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    if remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
