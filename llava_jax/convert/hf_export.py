"""(LlavaConfig, params) -> llava-hf directory that `LlavaForConditionalGeneration` loads.

A one-Linear projector (LLaVA-RLHF) has no llava-hf form, so it is written as linear_1,
an identity activation and an identity linear_2 (x @ I + 0 is exact in floating point).
When the image placeholder id lies past the vocabulary (checkpoints imported from the
original LLaVA layout), the embedding and LM head get extra rows, set to the mean row as
llava-hf's own conversion does, so HF can embed the placeholder; the logits over the
original vocabulary are unchanged.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

import numpy as np

from llava_jax.convert import hf_config, hf_keys
from llava_jax.convert.hf_files import ConversionError, write_sharded
from llava_jax.files import atomic_output_dir
from llava_jax.models.llava import LlavaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")
VOCAB_MULTIPLE = 64


def export_vocab_size(config: LlavaConfig) -> int:
    vocab = config.text.vocab_size
    if config.image_token_index < vocab:
        return vocab
    return -(-(config.image_token_index + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _get(params: dict, path: tuple[str, ...]) -> np.ndarray | None:
    node: Any = params
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _pad_rows(table: np.ndarray, rows: int) -> np.ndarray:
    if table.shape[0] == rows:
        return table
    mean = table.astype(np.float32).mean(axis=0, keepdims=True).astype(table.dtype)
    return np.concatenate([table, np.repeat(mean, rows - table.shape[0], axis=0)], axis=0)


def hf_tensors(config: LlavaConfig, params: dict, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (llava-hf name, array) one tensor at a time, in table order."""
    vocab = export_vocab_size(config)

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x if dtype is None else x.astype(dtype))

    for name, entry in hf_keys.PARAM_TABLE.items():
        value = _get(params, entry.path)
        if value is None:
            continue
        value = np.asarray(value)
        if entry.path == ("llm", "embed_tokens", "embedding"):
            value = _pad_rows(value, vocab)
        elif entry.path == ("llm", "lm_head", "kernel"):
            value = _pad_rows(value.T, vocab).T
        if entry.stacked:
            for layer in range(value.shape[0]):
                yield hf_keys.hf_name(entry.path, layer), cast(hf_keys.to_hf(value[layer], entry.layout))
        else:
            yield name, cast(hf_keys.to_hf(value, entry.layout))
    if config.projector_type == "linear":
        first = np.asarray(params["projector"]["linear_1"]["kernel"])
        width = first.shape[1]
        out_dtype = first.dtype if dtype is None else dtype
        yield hf_keys.PROJECTOR + "linear_2.weight", np.eye(width, dtype=out_dtype)
        yield hf_keys.PROJECTOR + "linear_2.bias", np.zeros(width, dtype=out_dtype)


def export_hf(config: LlavaConfig, params: dict, out_dir: str, *, tokenizer_dir: str | None = None,
              dtype: Any = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> list[str]:
    """Writes config.json, sharded safetensors and (optionally) tokenizer files; atomically."""
    dtype = None if dtype is None else np.dtype(dtype)
    leaf_dtype = np.asarray(params["llm"]["norm"]["scale"]).dtype if dtype is None else dtype
    hf = hf_config.llava_config_to_hf(config, export_vocab_size(config), _torch_dtype_name(leaf_dtype))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp)
        files = write_sharded(tmp, hf_tensors(config, params, dtype), max_shard_bytes=max_shard_bytes)
        if tokenizer_dir:
            copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
            if not copied:
                raise ConversionError(f"no tokenizer files in {tokenizer_dir}: expected one of {TOKENIZER_FILES}")
            for f in copied:
                shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    return files


def _torch_dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(np.dtype(dtype).name, "float32")
