"""A small tokenizer interface, so the toy tokenizer and real Vicuna look the same to the data code.

The data pipeline needs only four things from a tokenizer: encode a piece of text WITHOUT
adding BOS, decode, and the BOS / EOS / PAD ids. `HFTokenizer` adapts any HF tokenizer
loaded from a local directory (`AutoTokenizer.from_pretrained(path)`, never a download; the
generic tokenizers-backed class, e.g. the toy tokenizer's, directly: see `GENERIC_CLASSES`).

Conversations are encoded piece by piece (see `templates.py`), so a tokenizer must treat the
start of every piece as the start of a word: true for sentencepiece / LLaMA tokenizers (they
prepend "▁") and for the bundled toy tokenizer (Metaspace pre-tokenizer, prepend "always").
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any, Protocol, Sequence, runtime_checkable


# tokenizer_config.json classes that name transformers' generic tokenizers-backed class (one
# class under two names). AutoTokenizer resolves them to that same class, but importing it
# imports transformers' model configs and, where installed, torch: ~2 s of every driver's
# start (each test subprocess, each host of a pod) for nothing.
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


@runtime_checkable
class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        ...


class HFTokenizer:
    """`TextTokenizer` over a HF tokenizer (fast or slow; LLaMA/Vicuna or the toy one)."""

    def __init__(self, tokenizer: Any):
        self.hf = tokenizer
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs both a BOS and an EOS token")
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        # Vicuna ships no pad token; LLaVA pads with <unk> for the v1 template. Padding is
        # always masked, so the id only has to be a valid row of the embedding.
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.unk_token_id
        self.pad_id = int(pad if pad is not None else 0)
        # HF tokenizers may mutate their Rust state (truncation/padding settings) inside
        # encode, which fails ("Already borrowed") when loader threads call it at once.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str) -> "HFTokenizer":
        """Loads a tokenizer from a LOCAL directory (never contacts a hub)."""
        if tokenizer_class(path) in GENERIC_CLASSES and os.path.isfile(os.path.join(path, "tokenizer.json")):
            from transformers import TokenizersBackend

            return cls(TokenizersBackend.from_pretrained(path, local_files_only=True))
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path, local_files_only=True))

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        with self._lock:
            return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)


def tokenizer_class(path: str) -> str | None:
    """The `tokenizer_class` a tokenizer directory's tokenizer_config.json names, or None
    (no or unreadable file: AutoTokenizer then gives its own error or guess)."""
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("tokenizer_class") if isinstance(config, dict) else None


def load_tokenizer(path: str) -> HFTokenizer:
    """`HFTokenizer` from a local HF tokenizer directory (e.g. `data/toy/tokenizer`)."""
    return HFTokenizer.from_pretrained(path)
