"""Tiny random HF PyTorch models (and their directories) for parity and conversion tests.

Geometry: 28 px images with 14 px patches -> 4 patches ("224-style"); 42 px -> 9 patches
("336-style"). Everything float32 and seeded.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

IMAGE_TOKEN = 99
VOCAB = 100


def clip_config(image_size: int = 28, layers: int = 3) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=16)


def llama_config(kv_heads: int = 2, vocab: int = VOCAB, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=128, **kw)


def llava_model(projector: str = "mlp2x_gelu", image_size: int = 28, seed: int = 0,
                **llama_kw) -> transformers.LlavaForConditionalGeneration:
    """llava-hf model; projector "linear" = identity activation + identity linear_2 (our export form)."""
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=clip_config(image_size).to_dict(), text_config=llama_config(**llama_kw).to_dict(),
        image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    _randomise_norms(model)
    if projector == "linear":
        with torch.no_grad():
            lin2 = model.model.multi_modal_projector.linear_2
            lin2.weight.copy_(torch.eye(lin2.weight.shape[0]))
            lin2.bias.zero_()
    return model


def _randomise_norms(model: torch.nn.Module) -> None:
    """HF initialises norms to 1/0; random values make the parity tests see the scales."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))


def save_original_llava(directory: str, projector: str = "linear", seed: int = 0,
                        vision_tower: str = "openai/clip-vit-large-patch14") -> dict[str, torch.Tensor]:
    """Writes an original-LLaVA (LlavaLlamaForCausalLM) directory; returns its tensors."""
    torch.manual_seed(seed)
    llm = transformers.LlamaForCausalLM(llama_config()).eval()
    _randomise_norms(llm)
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    if projector == "linear":
        tensors["model.mm_projector.weight"] = torch.randn(32, 32) * 0.1
        tensors["model.mm_projector.bias"] = torch.randn(32) * 0.1
    else:
        for i in (0, 2):
            tensors[f"model.mm_projector.{i}.weight"] = torch.randn(32, 32) * 0.1
            tensors[f"model.mm_projector.{i}.bias"] = torch.randn(32) * 0.1
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = llama_config().to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower=vision_tower,
                  mm_hidden_size=32, mm_vision_select_layer=-2, mm_use_im_start_end=False,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad")
    if projector != "linear":
        config["mm_projector_type"] = projector
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return tensors


def save_clip(directory: str, image_size: int = 28, seed: int = 1) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(clip_config(image_size)).eval()
    _randomise_norms(model)
    model.save_pretrained(directory)
    return model


def save_llama(directory: str, seed: int = 2) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    _randomise_norms(model)
    model.save_pretrained(directory)
    return model


def left_padded_batch(seq: int, pads: list[int], vocab: int = VOCAB, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids (never the image token) with `pads[b]` left pad positions per item."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, min(vocab, IMAGE_TOKEN), size=(len(pads), seq))
    mask = np.ones_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    return ids, mask


def rel_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """max |diff| / max |ref| over the (non-pad) positions selected by `mask`."""
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
