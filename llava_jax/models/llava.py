"""LLaVA: CLIP vision tower + projector + LLaMA decoder.

Image placeholders are pre-expanded in `input_ids` to the patch count (as HF llava does),
so shapes stay static: the projected patch features of item b are written, in order, into
the positions of item b that hold `image_token_index`. Items without placeholders simply
ignore their image, so one batch may mix items with and without images. One image per item.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.clip import ClipVision, ClipVisionConfig
from llava_jax.models.config_utils import config_from_dict, config_to_dict
from llava_jax.models.layers import activation, dense
from llava_jax.models.llama import Llama, LlamaConfig, dense_kwargs

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: ClipVisionConfig = dataclasses.field(default_factory=ClipVisionConfig)
    text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    projector_type: str = "linear"  # linear (LLaVA-RLHF) | mlp2x_gelu (LLaVA-1.5)
    image_token_index: int = 32000
    vision_feature_layer: int = -2  # penultimate CLIP layer
    vision_feature_select_strategy: str = "default"  # default: drop CLS | full: keep it

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unsupported projector_type {self.projector_type!r}; expected one of {PROJECTOR_TYPES}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.vision_feature_select_strategy!r}")

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image in `input_ids`."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    def with_runtime(self, **knobs: Any) -> "LlavaConfig":
        """Sets runtime knobs (dtype, param_dtype, remat_policy, cpu_shapes) on both towers at
        once; the LLM's own (attention) on the LLM only."""
        vision_fields = {f.name for f in dataclasses.fields(self.vision)}
        vision = {k: v for k, v in knobs.items() if k in vision_fields}
        return dataclasses.replace(self, vision=dataclasses.replace(self.vision, **vision),
                                   text=dataclasses.replace(self.text, **knobs))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, without `cpu_shapes`: a choice of the run's devices, not of the model
        (a checkpoint written on CPU must not carry CPU shapes to a TPU run)."""
        data = config_to_dict(self)
        for tower in ("vision", "text"):
            data[tower].pop("cpu_shapes")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlavaConfig":
        data = dict(data)
        vision = config_from_dict(ClipVisionConfig, data.pop("vision", {}), "vision")
        text = config_from_dict(LlamaConfig, data.pop("text", {}), "text")
        return config_from_dict(cls, {**data, "vision": vision, "text": text}, "llava")


class Projector(nn.Module):
    """Maps vision features to the LLM width: one Linear, or Linear-GELU-Linear."""

    config: LlavaConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dense_kwargs(cfg.text, use_bias=True)
        x = dense(cfg.text.hidden_size, ("vision_embed", "embed"), name="linear_1", **kw)(features)
        if cfg.projector_type == "mlp2x_gelu":
            x = activation("gelu")(x)
            x = dense(cfg.text.hidden_size, ("embed", "embed_out"), name="linear_2", **kw)(x)
        return x


class Llava(nn.Module):
    """`Llava(config).apply({'params': p}, input_ids, pixel_values, attention_mask) -> logits`.

    pixel_values: NHWC float, already normalised, [B, H, W, C] (or None for text-only);
    logits: float32 [B, T, vocab].
    """

    config: LlavaConfig

    def setup(self):
        self.vision = ClipVision(self.config.vision)
        self.projector = Projector(self.config)
        self.llm = Llama(self.config.text)

    def vision_features(self, pixel_values: jax.Array) -> jax.Array:
        """The frozen tower's selected-layer patch features [B, num_image_tokens, D_vision].

        Compute once per batch and pass as `vision_features=` to every role sharing the tower
        (the projector, which an adapter may change, is applied per role).
        """
        cfg = self.config
        selected = self.vision(pixel_values, layer=cfg.vision_feature_layer)["selected"]
        if cfg.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return selected

    def image_features(self, pixel_values: jax.Array | None = None,
                       vision_features: jax.Array | None = None) -> jax.Array:
        """Projected patch features [B, num_image_tokens, D_text]."""
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        return self.projector(vision_features)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              vision_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings with projected image features written into the placeholder positions."""
        is_image = input_ids == self.config.image_token_index
        # The placeholder id may lie outside the vocabulary; look up a valid row instead.
        embeds = self.llm.embed(jnp.where(is_image, 0, input_ids))
        if vision_features is None and pixel_values is None:
            return embeds
        image_features = self.image_features(pixel_values, vision_features)
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
        per_token = jnp.take_along_axis(image_features, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], per_token.astype(embeds.dtype), embeds)

    def hidden(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, vision_features: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict | list | None = None,
               cache_index: jax.Array | int = 0, layers: list[dict] | None = None
               ) -> jax.Array | tuple[jax.Array, dict | list]:
        """Final normed LLM hidden states [B, T, D] (what reward / value heads read); with a
        KV `cache` (and optionally per-layer `layers`), (hidden, cache) as in `Llama.hidden`."""
        embeds = self.embed(input_ids, pixel_values, vision_features)
        return self.llm.hidden(embeds, attention_mask, positions, cache, cache_index, layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, *, vision_features: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(input_ids, pixel_values, attention_mask,
                                       vision_features=vision_features, positions=positions))


def init_params(config: LlavaConfig, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Random params for every module (vision, projector, LLM), e.g. for a tiny model.

    `boxed=True` keeps flax's LogicallyPartitioned boxes (logical axis names).
    """
    return _init_params(config, rng, boxed)


# One compiled program: run eagerly, `init` dispatches (and compiles) op by op, ~10x slower.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: LlavaConfig, rng: jax.Array, boxed: bool) -> dict:
    ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    size = config.vision.image_size
    pixels = jnp.zeros((1, size, size, config.vision.num_channels), jnp.float32)
    params = Llava(config).init(rng, ids, pixels)["params"]
    return params if boxed else nn.meta.unbox(params)


def logical_axes(config: LlavaConfig) -> Any:
    """Pytree of PartitionSpecs of logical axis names, matching the params tree."""
    boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), boxed=True))
    return nn.get_partition_spec(boxed)


def tiny_config(**runtime: Any) -> LlavaConfig:
    """A few-hundred-kilobyte LLaVA (2-layer CLIP, 2-layer LLaMA with GQA) for CPU demos and tests."""
    config = LlavaConfig(
        vision=ClipVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                num_layers=3, num_heads=4, projection_dim=32),
        text=LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=512),
        projector_type="linear", image_token_index=511)
    return config.with_runtime(**runtime) if runtime else config
