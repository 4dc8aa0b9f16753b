"""CLIP vision transformer (the LLaVA vision tower) in Flax Linen.

Patch convolution, class token, learned positions, pre-LayerNorm encoder layers with a
quick_gelu MLP, scanned over depth. Returns the hidden states of any layer, numbered as
HF does: 0 is the embedding output (after `pre_layrnorm`), i is the output of layer i,
so LLaVA's "penultimate layer" is -2.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.layers import activation, as_dtype, attention, dense, layer_norm, param_init, scan_layers


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # kept for the HF round trip; the vision tower does not use it
    # Runtime knobs (not part of the HF architecture).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    cpu_shapes: bool = False  # see LlamaConfig.cpu_shapes

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ClipAttention(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(use_bias=True, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype))
        b, t, d = x.shape
        heads = cfg.num_heads
        q, k, v = (dense(d, ("embed", "heads"), name=n, **kw)(x).reshape(b, t, heads, d // heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=None,
                        fold=cfg.cpu_shapes).reshape(b, t, d)
        return dense(d, ("heads", "embed"), name="o_proj", **kw)(out)


class ClipMLP(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(use_bias=True, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype))
        x = activation(cfg.hidden_act)(dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x))
        return dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class ClipLayer(nn.Module):
    config: ClipVisionConfig
    keep_all: bool = False  # emit every layer's output (for all_hidden_states)

    @nn.compact
    def __call__(self, x: jax.Array):
        cfg = self.config
        norm = (cfg.layer_norm_eps, as_dtype(cfg.dtype), as_dtype(cfg.param_dtype))
        x = x + ClipAttention(cfg, name="attn")(layer_norm(*norm, name="attn_norm")(x))
        x = x + ClipMLP(cfg, name="mlp")(layer_norm(*norm, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        # Emit every layer's output only when asked: stacking them costs L x activations.
        return x, (x if self.keep_all else None)


class ClipVision(nn.Module):
    """`__call__(pixels NHWC) -> {"selected", "hidden_states", "pooled"}`.

    `layer` picks the hidden state returned as `selected` (negative counts from the end,
    as in HF); `all_hidden_states=True` also returns all L+1 states stacked [L+1, B, T, D].
    """

    config: ClipVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, layer: int = -1,
                 all_hidden_states: bool = False) -> dict[str, jax.Array]:
        cfg = self.config
        dtype, param_dtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
        num_states = cfg.num_layers + 1
        index = layer % num_states
        if not -num_states <= layer < num_states:
            raise ValueError(f"vision layer {layer} out of range for {cfg.num_layers} layers")

        patches = nn.Conv(
            cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size,) * 2,
            padding="VALID", use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=param_init(nn.initializers.normal(0.02), (None, None, None, "embed")),
            name="patch_embed")(pixel_values.astype(dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embed", param_init(nn.initializers.normal(0.02), ("embed",)),
                         (cfg.hidden_size,), param_dtype)
        pos = self.param("pos_embed", param_init(nn.initializers.normal(0.02), (None, "embed")),
                         (cfg.num_patches + 1, cfg.hidden_size), param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, cfg.hidden_size)), patches], axis=1)
        x = x + pos.astype(dtype)[None]
        x = layer_norm(cfg.layer_norm_eps, dtype, param_dtype, name="pre_norm")(x)

        layers = scan_layers(ClipLayer, cfg.num_layers, cfg.remat_policy, num_broadcast=0)(
            cfg, all_hidden_states, name="layers")
        last, stacked = layers(x)
        out = {}
        if all_hidden_states:
            out["hidden_states"] = jnp.concatenate([x[None], stacked], axis=0)
            out["selected"] = out["hidden_states"][index]
        elif index == cfg.num_layers:
            out["selected"] = last
        else:
            # Run only the first `index` layers: slice the stacked params instead of paying
            # for layers whose output is thrown away (LLaVA drops the last one).
            out["selected"] = self._partial_stack(x, index)
        # post_layernorm on the class token is CLIP's pooled output; LLaVA does not use it
        # but the parameters are part of the checkpoint and round-trip through us.
        out["pooled"] = layer_norm(cfg.layer_norm_eps, dtype, param_dtype, name="post_norm")(last[:, 0])
        return out

    def _partial_stack(self, x: jax.Array, num_layers: int) -> jax.Array:
        if num_layers == 0:
            return x
        stacked = self.variables["params"]["layers"]
        sliced = jax.tree_util.tree_map(lambda p: nn.meta.unbox(p)[:num_layers], stacked)
        body = ClipLayer(self.config, parent=None)

        def step(h, layer_params):
            return body.apply({"params": layer_params}, h)[0], None

        return jax.lax.scan(step, x, sliced)[0]
