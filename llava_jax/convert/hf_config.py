"""HF `config.json` <-> our model configs, and detection of the checkpoint layout.

HF leaves fields at their defaults out of `config.json`, so the dicts are first passed
through transformers' own config classes (no remote code) to fill those defaults exactly
as the installed transformers would.
"""
from __future__ import annotations

import json
import os
from typing import Any

import transformers

from llava_jax.convert.hf_files import ConversionError
from llava_jax.models.clip import ClipVisionConfig
from llava_jax.models.llama import LlamaConfig
from llava_jax.models.llava import LlavaConfig

LAYOUTS = {
    "LlavaForConditionalGeneration": "llava_hf",
    "LlavaLlamaForCausalLM": "llava_original",
    "LlamaForCausalLM": "llama",
}


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"missing file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def detect_layout(hf: dict[str, Any], directory: str) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in LAYOUTS:
            return LAYOUTS[arch]
    if "mm_vision_tower" in hf or "mm_hidden_size" in hf:
        return "llava_original"
    if hf.get("model_type") == "llava" and "text_config" in hf:
        return "llava_hf"
    if hf.get("model_type") == "llama":
        return "llama"
    raise ConversionError(
        f"unsupported architecture {archs or hf.get('model_type')!r} in {directory}/config.json; expected "
        f"one of {sorted(LAYOUTS)}")


def _rope(hf_text: Any) -> dict[str, Any]:
    """Rope settings from either transformers 5 (`rope_parameters`) or 4 (`rope_scaling`)."""
    params = dict(getattr(hf_text, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf_text, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_text, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ConversionError(f"unsupported rope type {rope_type!r}")
    out = {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
    if rope_type != "default":
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_position=int(params["original_max_position_embeddings"]))
    return out


def text_config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    if d.get("model_type", "llama") not in ("llama", "llava"):
        raise ConversionError(f"unsupported language model type {d.get('model_type')!r}; expected llama")
    hf = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    for field, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if getattr(hf, field, ok) != ok:
            raise ConversionError(f"unsupported language model: {field}={getattr(hf, field)!r} (expected {ok!r})")
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
    return LlamaConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=hf.bos_token_id, eos_token_id=eos, pad_token_id=hf.pad_token_id, **_rope(hf))


def vision_config_from_hf(d: dict[str, Any]) -> ClipVisionConfig:
    if d.get("model_type") == "clip":  # a full CLIPModel directory
        d = d.get("vision_config", {})
    if d.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"unsupported vision tower type {d.get('model_type')!r}; expected clip_vision_model")
    hf = transformers.CLIPVisionConfig(**{k: v for k, v in d.items() if k != "model_type"})
    return ClipVisionConfig(
        image_size=hf.image_size, patch_size=hf.patch_size, num_channels=hf.num_channels,
        hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act, projection_dim=hf.projection_dim)


def llava_config_from_hf(d: dict[str, Any]) -> tuple[LlavaConfig, str]:
    """llava-hf config -> (config, HF projector activation)."""
    hf = transformers.LlavaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(f"unsupported vision_feature_layer {layer!r}: only a single layer is supported")
    act = hf.projector_hidden_act
    if act not in ("gelu", "linear"):
        raise ConversionError(f"unsupported projector_hidden_act {act!r}; expected gelu or linear")
    if not getattr(hf, "multimodal_projector_bias", True):
        raise ConversionError("unsupported multimodal_projector_bias=False")
    token = getattr(hf, "image_token_index", None)
    token = getattr(hf, "image_token_id", None) if token is None else token
    config = LlavaConfig(
        vision=vision_config_from_hf(hf.vision_config.to_dict()),
        text=text_config_from_hf(hf.text_config.to_dict()),
        projector_type="mlp2x_gelu", image_token_index=token,
        vision_feature_layer=layer, vision_feature_select_strategy=hf.vision_feature_select_strategy)
    return config, act


def original_llava_config(d: dict[str, Any], vision: ClipVisionConfig) -> LlavaConfig:
    """LlavaLlamaForCausalLM config (mm_* fields on top of a llama config)."""
    if d.get("mm_use_im_start_end"):
        raise ConversionError("unsupported mm_use_im_start_end=true (image start/end tokens)")
    projector = d.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise ConversionError(f"unsupported mm_projector_type {projector!r}; expected linear or mlp2x_gelu")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(f"mm_hidden_size {d['mm_hidden_size']} does not match the vision tower's "
                              f"hidden_size {vision.hidden_size}")
    feature = d.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConversionError(f"unsupported mm_vision_select_feature {feature!r}")
    text = {k: v for k, v in d.items() if not k.startswith("mm_")}
    return new_llava_config(text_config_from_hf(text), vision, projector,
                            layer=d.get("mm_vision_select_layer", -2),
                            strategy="default" if feature == "patch" else "full")


def new_llava_config(text: LlamaConfig, vision: ClipVisionConfig, projector: str, layer: int = -2,
                     strategy: str = "default") -> LlavaConfig:
    # LLaVA's own code uses -200 for the placeholder; we use the first id past the
    # vocabulary (what llava-hf adds as `<image>`), so ids stay non-negative.
    return LlavaConfig(vision=vision, text=text, projector_type=projector,
                       image_token_index=text.vocab_size, vision_feature_layer=layer,
                       vision_feature_select_strategy=strategy)


def llava_config_to_hf(config: LlavaConfig, vocab_size: int, dtype: str) -> transformers.LlavaConfig:
    """Our config -> transformers.LlavaConfig (a linear projector is written as
    linear_1 + identity activation + identity linear_2)."""
    t, v = config.text, config.vision
    rope: dict[str, Any] = {"rope_type": t.rope_type, "rope_theta": t.rope_theta}
    if t.rope_type != "default":
        rope["factor"] = t.rope_factor
    if t.rope_type == "llama3":
        rope.update(low_freq_factor=t.rope_low_freq_factor, high_freq_factor=t.rope_high_freq_factor,
                    original_max_position_embeddings=t.rope_original_max_position)
    text = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id, rope_parameters=rope, rope_theta=t.rope_theta,
        rope_scaling=None if t.rope_type == "default" else rope)
    vision = transformers.CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
        projection_dim=v.projection_dim)
    hf = transformers.LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=config.image_token_index,
        projector_hidden_act="gelu" if config.projector_type == "mlp2x_gelu" else "linear",
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_seq_length=config.num_image_tokens, tie_word_embeddings=t.tie_word_embeddings)
    hf.architectures = ["LlavaForConditionalGeneration"]
    # transformers 5 renamed `torch_dtype` to `dtype`.
    setattr(hf, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
    return hf
