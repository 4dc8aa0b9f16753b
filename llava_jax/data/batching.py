"""Collating examples into static-shape batches: bucket lengths, padding side, masks.

A batch is a dict of numpy arrays, plus `meta` (a list of per-item dicts for host-side use:
ids, image names, captions, questions; never passed to jit). Sequence length is the smallest
configured bucket that fits the longest sequence in the batch, so a run compiles once per
bucket. Every batch carries `valid` [B] (0 marks padding slots of a final partial batch).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Schema:
    """What a dataset's examples hold and how to pad them.

    sequences: name -> pad value; an example holds a 1-D int array, or with `pairs` a
      2-tuple of them (batched as [B, 2, T]). masks: mask name -> the sequence it marks
      (1 on real tokens). images: name -> [H, W, 3]; an example's None becomes zeros (a
      text-only item). scalars: name -> dtype.
    """

    sequences: Mapping[str, int]
    masks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    images: Mapping[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    scalars: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pairs: bool = False

    def batch_shapes(self, batch_size: int, length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """(shape, dtype) of each array `collate` yields for `batch_size` examples in the
        `length` bucket (`meta` left out): what a compile check lays out without data."""
        seq = (batch_size, 2, length) if self.pairs else (batch_size, length)
        out: dict[str, tuple[tuple[int, ...], Any]] = {name: (seq, np.int32) for name in (*self.sequences, *self.masks)}
        out.update({name: ((batch_size, *shape), np.float32) for name, shape in self.images.items()})
        out.update({name: ((batch_size,), np.dtype(dtype)) for name, dtype in self.scalars.items()})
        out["valid"] = ((batch_size,), np.int32)
        return out


def default_buckets(max_length: int, count: int = 3, multiple: int = 8) -> tuple[int, ...]:
    """`count` lengths up to `max_length`, halving each time, rounded up to `multiple`."""
    out = {max_length}
    length = max_length
    for _ in range(count - 1):
        length = -(-(length // 2) // multiple) * multiple
        if length < multiple:
            break
        out.add(length)
    return tuple(sorted(out))


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"sequence of length {length} exceeds the largest bucket {max(buckets)}")


def _pad(seq: np.ndarray, length: int, value: int, left: bool) -> np.ndarray:
    out = np.full((length,), value, np.int32)
    if left:
        out[length - len(seq):] = seq
    else:
        out[:len(seq)] = seq
    return out


def collate(examples: Sequence[Mapping[str, Any] | None], schema: Schema, buckets: Sequence[int],
            pad_side: str = "right") -> Batch:
    """Stacks examples (None = an empty padding slot) into a batch of fixed shapes."""
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    left = pad_side == "left"
    width = 2 if schema.pairs else 1
    empty = (np.zeros((0,), np.int32),) * width

    def seqs(ex, name):
        if ex is None:
            return empty
        return tuple(ex[name]) if schema.pairs else (ex[name],)

    longest = max((len(s) for ex in examples for name in schema.sequences for s in seqs(ex, name)), default=1)
    length = pick_bucket(max(longest, 1), buckets)
    batch: Batch = {}

    def stack(name, fill, make):
        out = np.stack([np.stack([_pad(make(s), length, fill, left) for s in seqs(ex, name)]) for ex in examples])
        return out if schema.pairs else out[:, 0]

    for name, pad_value in schema.sequences.items():
        batch[name] = stack(name, pad_value, np.asarray)
    for mask_name, seq_name in schema.masks.items():
        batch[mask_name] = stack(seq_name, 0, lambda s: np.ones(len(s), np.int32))
    for name, shape in schema.images.items():
        pixels = np.zeros((len(examples), *shape), np.float32)
        for i, ex in enumerate(examples):
            if ex is not None and ex.get(name) is not None:
                pixels[i] = ex[name]
        batch[name] = pixels
    for name, dtype in schema.scalars.items():
        batch[name] = np.asarray([ex[name] if ex is not None else 0 for ex in examples], dtype)
    batch["valid"] = np.asarray([ex is not None for ex in examples], np.int32)
    batch["meta"] = [ex.get("meta") if ex is not None else None for ex in examples]
    return batch
