"""PEFT LoRA adapters <-> our adapter trees, and reward/value head files.

Reads `adapter_config.json` + `adapter_model.safetensors` (or `.bin`, weights_only) in
the llava-hf key layout (`base_model.model.model.language_model.layers.N...` or the
transformers-4 `base_model.model.language_model.model.layers.N...`) and in the original
LLaVA layout of LLaVA-RLHF's released adapters (`base_model.model.model.layers.N...`,
possibly under `adapter_model/lora_default/`). Module names go through the same table as
full checkpoints (hf_keys). Writes adapters that `peft.PeftModel.from_pretrained` loads
onto the installed transformers' `LlavaForConditionalGeneration`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import transformers

from llava_jax.convert import hf_keys
from llava_jax.convert.hf_files import ConversionError, TensorSource, read_safetensors, write_safetensors
from llava_jax.files import atomic_output_dir
from llava_jax.models.heads import HEAD_KINDS
from llava_jax.models.lora import LLM_TARGETS, PROJECTOR_TARGETS, Adapter, LoraConfig, check_adapter

_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}


def resolve_peft_dir(directory: str) -> str:
    """LLaVA-RLHF nests adapters as DIR/adapter_model/lora_default; accept any level."""
    for sub in ("", "adapter_model", os.path.join("adapter_model", "lora_default"), "lora_default"):
        candidate = os.path.join(directory, sub)
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            return candidate
    raise ConversionError(f"no adapter_config.json in {directory} (nor adapter_model/, adapter_model/lora_default/)")


def _lora_config(peft_dir: str) -> dict[str, Any]:
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{peft_dir}: unsupported peft_type {cfg.get('peft_type')!r}; only LORA")
    for key, ok in _UNSUPPORTED.items():
        if cfg.get(key, ok) not in (ok, None):
            raise ConversionError(f"{peft_dir}: unsupported adapter_config {key}={cfg[key]!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConversionError(f"{peft_dir}: per-module rank_pattern / alpha_pattern are not supported")
    return cfg


def _check_targets(cfg: dict[str, Any], peft_dir: str) -> None:
    """Named target modules must be layers our base has (a regex is checked by its keys)."""
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        known = set(LLM_TARGETS) | set(PROJECTOR_TARGETS) | {"mm_projector"}
        bad = sorted(t for t in targets if t.split(".")[-1] not in known)
        if bad:
            raise ConversionError(f"{peft_dir}: target modules {bad} are not LoRA-adaptable layers of the base "
                                  f"(adaptable: {sorted(known)})")


def read_peft_adapter(directory: str, base: dict) -> Adapter:
    """PEFT directory -> Adapter over `base` (params tree or ShapeDtypeStructs)."""
    peft_dir = resolve_peft_dir(directory)
    cfg = _lora_config(peft_dir)
    _check_targets(cfg, peft_dir)
    rank = int(cfg["r"])
    tensors: dict[tuple[tuple[str, ...], int | None, str], np.ndarray] = {}
    with TensorSource(peft_dir) as source:
        names = source.keys()
        layout = "llava_hf" if any("language_model" in n or "multi_modal_projector" in n for n in names) \
            else "llava_original"
        for name in names:
            m = _LORA_KEY.match(name)
            canonical = hf_keys.canonical_name(m.group(1) + ".weight", layout) if m else None
            found = hf_keys.lookup(canonical) if canonical else None
            if found is None or found[0].layout != "linear":
                raise ConversionError(f"{peft_dir}: unexpected adapter tensor {name}")
            entry, layer = found
            value = source.get(name).T  # lora_A [r, in] -> a [in, r]; lora_B [out, r] -> b [r, out]
            key = "a" if m.group(2) == "A" else "b"
            if value.shape[1 if key == "a" else 0] != rank:
                raise ConversionError(f"{peft_dir}: {name} has rank {value.shape[1 if key == 'a' else 0]}, "
                                      f"adapter_config.json says r={rank}")
            kernel = base
            for k in entry.path:
                if not isinstance(kernel, dict) or k not in kernel:
                    raise ConversionError(f"{peft_dir}: {name} adapts {'/'.join(entry.path[:-1])}, "
                                          "which the base model does not have")
                kernel = kernel[k]
            fan_in, fan_out = kernel.shape[-2:]
            want = (fan_in, rank) if key == "a" else (rank, fan_out)
            if value.shape != want:
                raise ConversionError(f"shape mismatch for {name}: expected {want[::-1]} for the base layer, "
                                      f"found {value.shape[::-1]}")
            tensors[(entry.path[:-1], layer, key)] = value
    llm = sorted({p[-1] for p, _, _ in tensors if p[0] == "llm"}, key=LLM_TARGETS.index)
    lora = LoraConfig(rank=rank, alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                      targets=tuple(llm), projector=tuple(sorted({p[-1] for p, _, _ in tensors if p[0] == "projector"})))
    params: dict = {}
    for (path, layer, key), value in sorted(tensors.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        node = params
        for k in path:
            node = node.setdefault(k, {})
        if layer is None:
            node[key] = value
        else:
            node.setdefault(key, []).append((layer, value))
    _stack_layers(params, peft_dir)
    adapter = Adapter(params, lora)
    try:
        check_adapter(base, adapter, peft_dir)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return adapter


def _stack_layers(node: dict, where: str) -> None:
    for key, value in node.items():
        if isinstance(value, dict):
            _stack_layers(value, where)
        elif isinstance(value, list):
            layers = dict(value)
            missing = sorted(set(range(max(layers) + 1)) - set(layers))
            if missing:
                raise ConversionError(f"{where}: adapter tensors missing for layers {missing}")
            node[key] = np.stack([layers[i] for i in range(len(layers))])


def read_head(directory: str, hidden_size: int) -> tuple[dict, str] | None:
    """A reward/value head in the adapter directory or between it and `directory` (LLaVA-RLHF
    keeps `reward_head` in DIR, the adapter in DIR/adapter_model/lora_default): safetensors
    (ours) or a torch state dict (read with weights_only=True)."""
    top = os.path.normpath(directory)
    where = os.path.normpath(resolve_peft_dir(directory))
    chain = [where]
    while where != top and len(chain) < 3:
        where = os.path.dirname(where)
        chain.append(where)
    for where in chain:
        for kind in HEAD_KINDS:
            for file in (f"{kind}_head.safetensors", f"{kind}_head", f"{kind}_head.bin", f"{kind}_head.pt"):
                path = os.path.join(where, file)
                if os.path.isfile(path):
                    return _load_head_file(path, hidden_size), kind
    return None


def _load_head_file(path: str, hidden_size: int) -> dict:
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        import torch  # noqa: PLC0415

        state = {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or tuple(weight.shape) != (1, hidden_size) or bias is None or tuple(bias.shape) != (1,):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ConversionError(f"{path}: expected a Linear({hidden_size}, 1) head (weight (1, {hidden_size}), "
                              f"bias (1,)), found {shapes}")
    return {"kernel": np.asarray(weight, np.float32).T.copy(), "bias": np.asarray(bias, np.float32)}


def _module_name(canonical: str) -> str:
    """Canonical (transformers-4 hub) module name -> the installed transformers' name."""
    if int(transformers.__version__.split(".")[0]) < 5:
        return canonical
    for old, new in ((hf_keys.LLM, "model.language_model."), (hf_keys.PROJECTOR, "model.multi_modal_projector.")):
        if canonical.startswith(old):
            return new + canonical[len(old):]
    return canonical


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """Our adapter -> PEFT state dict (llava-hf module names)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapter.params)[0]:
        keys = tuple(k.key for k in path)
        module, ab = keys[:-1], keys[-1]
        value = np.asarray(leaf)
        entry = hf_keys.PARAM_TABLE[hf_keys.BY_PATH[module + ("kernel",)]]
        layers = range(value.shape[0]) if entry.stacked else [None]
        for layer in layers:
            canonical = hf_keys.hf_name(module + ("kernel",), layer)[: -len(".weight")]
            name = f"base_model.model.{_module_name(canonical)}.lora_{ab.upper()}.weight"
            out[name] = np.ascontiguousarray((value[layer] if layer is not None else value).T)
    return out


def write_peft_adapter(out_dir: str, adapter: Adapter, head: dict | None = None, head_kind: str | None = None,
                       *, base_model_name_or_path: str | None = None, overwrite: bool = False) -> None:
    lora = adapter.config
    modules = "|".join(lora.targets)
    pattern = rf".*language_model.*\.({modules})" if modules else ""
    if lora.projector:
        pattern += (r"|" if pattern else "") + rf".*multi_modal_projector\.({'|'.join(lora.projector)})"
    config = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": pattern, "bias": "none", "task_type": None, "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        write_safetensors(os.path.join(tmp, "adapter_model.safetensors"), peft_tensors(adapter),
                          metadata={"format": "pt"})
        if head is not None:
            write_safetensors(os.path.join(tmp, f"{head_kind}_head.safetensors"),
                              {"weight": np.asarray(head["kernel"], np.float32).T.copy(),
                               "bias": np.asarray(head["bias"], np.float32)}, metadata={"format": "pt"})
