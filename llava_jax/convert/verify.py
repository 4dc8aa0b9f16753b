"""Logit check of a converted checkpoint against HF PyTorch on the same random inputs.

The batch mixes an image item without padding, a left-padded image item and a
left-padded text-only item. llava-hf directories run as `LlavaForConditionalGeneration`;
the original LLaVA layout and plain LLaMA (which HF cannot run as LLaVA without remote
code) run as HF `CLIPVisionModel` + the checkpoint's projector in torch +
`LlamaForCausalLM` fed with the merged embeddings. Needs torch (the `test` extra).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from llava_jax.convert import hf_config
from llava_jax.convert.hf_files import ConversionError
from llava_jax.models.llava import Llava, LlavaConfig


@dataclasses.dataclass
class VerifyResult:
    max_abs_error: float
    max_abs_logit: float
    rel_error: float
    compared_tokens: int


def random_batch(config: LlavaConfig, seed: int = 0, text_len: int = 8) -> dict[str, np.ndarray]:
    """ids/mask/positions/pixels for [image, padded image, padded text-only] items."""
    rng = np.random.RandomState(seed)
    n_img, pad = config.num_image_tokens, 3
    seq = 1 + n_img + text_len + pad
    high = min(config.text.vocab_size, config.image_token_index)
    ids = rng.randint(3, high, size=(3, seq))
    mask = np.ones((3, seq), np.int64)
    image_item = [config.text.bos_token_id or 1] + [config.image_token_index] * n_img
    ids[0, :1 + n_img] = image_item
    ids[1, pad:pad + 1 + n_img] = image_item
    ids[1:, :pad] = config.text.pad_token_id or 0
    mask[1:, :pad] = 0
    size = config.vision.image_size
    pixels = rng.randn(3, size, size, config.vision.num_channels).astype(np.float32)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return {"input_ids": ids, "attention_mask": mask, "positions": positions, "pixel_values": pixels,
            "has_image": np.array([True, True, False])}


def _torch_reference(hf_dir: str, vision_dir: str | None, config: LlavaConfig, batch: dict, dtype: Any):
    import torch
    import transformers

    from llava_jax.convert.hf_files import TensorSource
    from llava_jax.convert.hf_keys import canonical_name

    hf = hf_config.read_config(hf_dir)
    layout = hf_config.detect_layout(hf, hf_dir)
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    pos = torch.tensor(batch["positions"])
    pixels = torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2)[torch.tensor(batch["has_image"])]
    with torch.no_grad():
        if layout == "llava_hf":
            model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).eval()
            return model(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=mask,
                         position_ids=pos).logits.float().numpy()
        llm = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        vdir = vision_dir or hf.get("mm_vision_tower")
        vision = transformers.CLIPVisionModel.from_pretrained(vdir, dtype=dtype).eval()
        embeds = llm.get_input_embeddings()(torch.where(ids == config.image_token_index, 0, ids))
        if layout == "llava_original":
            with TensorSource(hf_dir) as source:
                proj = {canonical_name(k, layout): torch.from_numpy(np.asarray(source.get(k), np.float32)).to(dtype)
                        for k in source.keys() if "mm_projector" in k}
            states = vision(pixels.to(dtype), output_hidden_states=True).hidden_states[config.vision_feature_layer]
            if config.vision_feature_select_strategy == "default":
                states = states[:, 1:]
            p = "multi_modal_projector."
            feats = states @ proj[p + "linear_1.weight"].T + proj[p + "linear_1.bias"]
            if config.projector_type == "mlp2x_gelu":
                feats = torch.nn.functional.gelu(feats) @ proj[p + "linear_2.weight"].T + proj[p + "linear_2.bias"]
            is_img = ids == config.image_token_index
            embeds = embeds.clone()
            embeds[is_img] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        # plain LLaMA: the projector is fresh, so only the text path is comparable.
        return llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits.float().numpy()


def verify(hf_dir: str, config: LlavaConfig, params: dict, vision_dir: str | None = None,
           dtype: str = "float32", seed: int = 0) -> VerifyResult:
    """Runs both models; errors are measured over non-pad tokens of comparable items."""
    try:
        import torch
    except ImportError:
        raise ConversionError("verify needs PyTorch: pip install 'llava_jax[test]'") from None
    import jax

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    batch = random_batch(config, seed)
    layout = hf_config.detect_layout(hf_config.read_config(hf_dir), hf_dir)
    if layout == "llama":  # fresh projector: compare the text-only item alone
        batch = {k: v[2:] for k, v in batch.items()}
    ref = _torch_reference(hf_dir, vision_dir, config, batch, torch_dtype)
    run_cfg = config.with_runtime(dtype=dtype)
    ours = jax.jit(lambda p, b: Llava(run_cfg).apply({"params": p}, b["input_ids"], b["pixel_values"],
                                                     b["attention_mask"], positions=b["positions"]))(
        params, {k: v for k, v in batch.items() if k != "has_image"})
    ours = np.asarray(ours)[..., :ref.shape[-1]]
    ref = ref[..., :ours.shape[-1]]  # an export may pad the vocabulary
    valid = batch["attention_mask"].astype(bool)
    max_err = float(np.abs(ours - ref)[valid].max())
    max_logit = float(np.abs(ref[valid]).max())
    return VerifyResult(max_err, max_logit, max_err / max_logit, int(valid.sum()))
