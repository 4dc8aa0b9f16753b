"""The one table between HF tensor names and our parameter paths.

HF checkpoints come in several layouts; `canonical_name` first rewrites every source name
to the names transformers 5's `LlavaForConditionalGeneration.save_pretrained` writes
(`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`), which is also what `export` writes. The older llava-hf
layout, with the tower under `vision_tower.vision_model.*` (transformers 4 and most
published checkpoints), is read as well. `PARAM_TABLE` then maps each canonical name to a
path in our params tree and says how the tensor is laid out (PyTorch Linear stores
[out, in], Flax Dense [in, out]).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

VISION = "vision_tower."
PROJECTOR = "multi_modal_projector."
LLM = "language_model.model."
LM_HEAD = "language_model.lm_head."

# Source layout -> ordered (source prefix, canonical prefix) rewrites; first match wins.
LAYOUT_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "llava_hf": [
        # transformers 4 nests CLIP's modules under `vision_model.`; 5 does not
        ("model.vision_tower.vision_model.", VISION), ("vision_tower.vision_model.", VISION),
        ("model.vision_tower.", VISION), (VISION, VISION),
        ("model.multi_modal_projector.", PROJECTOR), (PROJECTOR, PROJECTOR),
        ("model.language_model.", LLM), (LLM, LLM),
        (LM_HEAD, LM_HEAD), ("lm_head.", LM_HEAD),
    ],
    # LlavaLlamaForCausalLM (the original LLaVA / LLaVA-RLHF code).
    "llava_original": [
        ("model.mm_projector.0.", PROJECTOR + "linear_1."),
        ("model.mm_projector.2.", PROJECTOR + "linear_2."),
        ("model.mm_projector.", PROJECTOR + "linear_1."),
        ("model.vision_tower.vision_tower.vision_model.", VISION),
        ("model.", LLM), ("lm_head.", LM_HEAD),
    ],
    "llama": [("model.", LLM), ("lm_head.", LM_HEAD)],
    # CLIPModel or CLIPVisionModel directory: only the vision half is ours.
    # transformers 5 saves CLIPVisionModel without the `vision_model.` prefix.
    "clip": [("vision_model.", VISION), ("", VISION)],
}
# Names a layout may carry that hold no parameter of ours (buffers, CLIP's text half).
IGNORED = {
    "llava_hf": [r"\.rotary_emb\.inv_freq$", r"embeddings\.position_ids$"],
    "llava_original": [r"\.rotary_emb\.inv_freq$", r"embeddings\.position_ids$"],
    "llama": [r"\.rotary_emb\.inv_freq$"],
    "clip": [r"^text_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$",
             r"embeddings\.position_ids$"],
}


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # path in our params tree
    layout: str  # "linear" (transpose) | "conv" (OIHW -> HWIO) | "same"
    stacked: bool  # True: one HF tensor per layer, ours stacked on a leading axis


def _build_table() -> dict[str, Entry]:
    table: dict[str, Entry] = {}

    def add(hf: str, path: str, layout: str) -> None:
        table[hf] = Entry(tuple(path.split("/")), layout, "{i}" in hf)

    def linear(hf: str, path: str, bias: bool) -> None:
        add(hf + ".weight", path + "/kernel", "linear")
        if bias:
            add(hf + ".bias", path + "/bias", "same")

    def norm(hf: str, path: str, bias: bool) -> None:
        add(hf + ".weight", path + "/scale", "same")
        if bias:
            add(hf + ".bias", path + "/bias", "same")

    v = VISION
    add(v + "embeddings.class_embedding", "vision/class_embed", "same")
    add(v + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv")
    add(v + "embeddings.position_embedding.weight", "vision/pos_embed", "same")
    norm(v + "pre_layrnorm", "vision/pre_norm", bias=True)
    norm(v + "post_layernorm", "vision/post_norm", bias=True)
    vl = v + "encoder.layers.{i}."
    for hf, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
        linear(vl + "self_attn." + hf, "vision/layers/attn/" + ours, bias=True)
    norm(vl + "layer_norm1", "vision/layers/attn_norm", bias=True)
    norm(vl + "layer_norm2", "vision/layers/mlp_norm", bias=True)
    for fc in ("fc1", "fc2"):
        linear(vl + "mlp." + fc, "vision/layers/mlp/" + fc, bias=True)

    for lin in ("linear_1", "linear_2"):
        linear(PROJECTOR + lin, "projector/" + lin, bias=True)

    add(LLM + "embed_tokens.weight", "llm/embed_tokens/embedding", "same")
    norm(LLM + "norm", "llm/norm", bias=False)
    ll = LLM + "layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        linear(ll + "self_attn." + proj, "llm/layers/attn/" + proj, bias=False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        linear(ll + "mlp." + proj, "llm/layers/mlp/" + proj, bias=False)
    norm(ll + "input_layernorm", "llm/layers/input_norm", bias=False)
    norm(ll + "post_attention_layernorm", "llm/layers/post_attn_norm", bias=False)
    linear(LM_HEAD[:-1], "llm/lm_head", bias=False)
    return table


PARAM_TABLE: dict[str, Entry] = _build_table()
_PATTERNS = [(re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), hf, e)
             for hf, e in PARAM_TABLE.items()]
BY_PATH: dict[tuple[str, ...], str] = {e.path: hf for hf, e in PARAM_TABLE.items()}


def canonical_name(name: str, layout: str) -> str | None:
    """Source tensor name -> canonical llava-hf name; None when the layout ignores it."""
    if any(re.search(p, name) for p in IGNORED[layout]):
        return None
    for src, dst in LAYOUT_PREFIXES[layout]:
        if name.startswith(src):
            return dst + name[len(src):]
    return name  # unknown; reported by the caller


def lookup(canonical: str) -> tuple[Entry, int | None] | None:
    """Canonical HF name -> (table entry, layer index or None)."""
    for pattern, _, entry in _PATTERNS:
        m = pattern.match(canonical)
        if m:
            return entry, (int(m.group(1)) if entry.stacked else None)
    return None


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """Our param path (+ layer) -> canonical HF name (what export writes)."""
    name = BY_PATH[path]
    return name.replace("{i}", str(layer)) if layer is not None else name


def to_ours(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def to_hf(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    return array
