"""A deterministic, resumable, per-process-sharded batch loader with parallel image decoding.

Order: epoch e visits a permutation of the dataset drawn from (seed, e); process p of P takes
the p-th block of batch_size in every global batch (so the global batch is the 1-process
run's, row for row), cut to the same length on every process, so the P shards are disjoint and a step consumes the same number of indices everywhere. Examples are
built (image decode + tokenisation) by a thread pool a few batches ahead, but consumed
strictly in order, so threading never changes the result. A bad example is skipped and the
next one takes its place; batches run on across epoch boundaries (`num_epochs=None`: an
endless stream; the training driver decides the step count).

State: `state()` = {epoch, position, seed, ...}: where the NEXT batch starts in this
process's stream. `restore(state)` continues from there, giving exactly the batches the
uninterrupted run would have given. Each process saves its own state (skips can differ).

Shapes: batch size is fixed (per process: global batch / process count); sequence length
is the smallest bucket that fits the batch.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Iterator, Sequence

import numpy as np

from llava_jax.data.batching import Batch, collate, default_buckets


def _process_info(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for process_count {count}")
    return index, count


class Loader:
    """Iterates static-shape batches of `dataset` (anything with `__len__`, `load(i)`, `schema`).

    Args:
      batch_size: examples per batch in THIS process.
      seed / shuffle: the epoch permutations. num_epochs: None = endless.
      drop_remainder: with finite epochs, drop a last partial batch (else pad it with
        `valid == 0` slots; shards are then padded, not cut, so every index is seen once).
      buckets: sequence lengths (default: 3 lengths up to `dataset.max_length`).
      pad_side: "right" (SFT / reward training) or "left" (prompts to generate from).
      num_workers: decoding threads (0: decode in the calling thread). prefetch: batches
        decoded ahead. process_index / process_count: default `jax.process_index/count()`.
    """

    def __init__(self, dataset: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True, buckets: Sequence[int] | None = None,
                 pad_side: str = "right", num_workers: int = 2, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.shuffle, self.num_epochs, self.drop_remainder = seed, shuffle, num_epochs, drop_remainder
        self.buckets = tuple(sorted(buckets or default_buckets(dataset.max_length)))
        if self.buckets[-1] < dataset.max_length:
            raise ValueError(f"largest bucket {self.buckets[-1]} < dataset max_length {dataset.max_length}")
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
        self.pad_side, self.num_workers, self.prefetch = pad_side, num_workers, max(prefetch, 1)
        self.process_index, self.process_count = _process_info(process_index, process_count)
        if len(dataset) < self.process_count:
            raise ValueError(f"{len(dataset)} examples cannot be sharded over {self.process_count} processes")
        self._cursor = (0, 0)  # (epoch, position) where the next batch starts
        self._gen: Iterator | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._orders: dict[int, np.ndarray] = {}

    # -- order
    def shard_order(self, epoch: int) -> np.ndarray:
        """Dataset indices this process visits in `epoch`, in order (-1: a padding slot)."""
        if epoch not in self._orders:
            n, count = len(self.dataset), self.process_count
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            # Process p takes the p-th block of batch_size in each global batch: the global batch
            # (process 0's rows first) is then the batch a 1-process run draws, in its order,
            # and so is everything derived per row (rollout samples, caption orders). The
            # epoch's tail, short of a global batch, is dealt out row by row.
            full = n // (count * self.batch_size) * count * self.batch_size
            blocks = perm[:full].reshape(-1, count, self.batch_size)[:, self.process_index].reshape(-1)
            shard = np.concatenate([blocks, perm[full:][self.process_index::count]])
            if self.drop_remainder or self.num_epochs is None:
                shard = shard[:n // count]
            else:
                shard = np.concatenate([shard, np.full(-(-n // count) - len(shard), -1)])
            self._orders = {epoch: shard}  # keep one epoch: orders are cheap to redraw
        return self._orders[epoch]

    def steps_per_epoch(self) -> int:
        """Batches per epoch if no example is skipped."""
        n = len(self.shard_order(0))
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    # -- state
    def state(self) -> dict:
        epoch, position = self._cursor
        return {"epoch": epoch, "position": position, "seed": self.seed,
                "process_index": self.process_index, "process_count": self.process_count}

    def restore(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        if int(state.get("process_count", self.process_count)) != self.process_count:
            raise ValueError("state was saved with a different process count")
        self._close_gen()
        self._cursor = (int(state["epoch"]), int(state["position"]))

    # -- iteration
    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> Batch:
        if self._gen is None:
            self._gen = self._batches(*self._cursor)
        batch, self._cursor = next(self._gen)
        return batch

    def _stream(self, epoch: int, position: int):
        """(index, cursor after it) for the rest of this process's stream."""
        while self.num_epochs is None or epoch < self.num_epochs:
            order = self.shard_order(epoch)
            for p in range(position, len(order)):
                nxt = (epoch, p + 1) if p + 1 < len(order) else (epoch + 1, 0)
                yield int(order[p]), nxt
            epoch, position = epoch + 1, 0

    def _load(self, index: int):
        return None if index < 0 else self.dataset.load(index)

    def _examples(self, epoch: int, position: int):
        """(example or None-if-skipped, is_padding, cursor after), decoded ahead in threads."""
        stream = self._stream(epoch, position)
        if self.num_workers == 0:
            for index, cursor in stream:
                yield self._load(index), index < 0, cursor
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="llava-data")
        window = collections.deque()
        ahead = self.prefetch * self.batch_size
        try:
            for index, cursor in stream:
                window.append((self._pool.submit(self._load, index), index < 0, cursor))
                if len(window) >= ahead:
                    future, pad, cur = window.popleft()
                    yield future.result(), pad, cur
            while window:
                future, pad, cur = window.popleft()
                yield future.result(), pad, cur
        finally:
            for future, _, _ in window:
                future.cancel()

    def _batches(self, epoch: int, position: int):
        slots: list = []
        cursor = (epoch, position)
        skipped_in_a_row, shard_len = 0, len(self.shard_order(epoch))
        for example, pad, cursor in self._examples(epoch, position):
            if example is None and not pad:
                # A bad example (reported by the dataset): the next one takes its place. A
                # whole epoch of them would otherwise make an endless stream spin forever.
                skipped_in_a_row += 1
                if skipped_in_a_row > shard_len:
                    raise RuntimeError(f"no usable example in a whole epoch: {self.summary()}")
                continue
            skipped_in_a_row = 0
            slots.append(example)
            if len(slots) == self.batch_size:
                yield self._collate(slots), cursor
                slots = []
        if slots and any(s is not None for s in slots) and not self.drop_remainder:
            yield self._collate(slots + [None] * (self.batch_size - len(slots))), cursor

    def _collate(self, slots: list) -> Batch:
        return collate(slots, self.dataset.schema, self.buckets, self.pad_side)

    def pad_to(self, batch: Batch, length: int) -> Batch:
        """`batch` with its sequences and masks padded (on `pad_side`, with the schema's pad
        values) to `length`, as if collated at that bucket: processes of a multi-process run
        pad to the longest bucket any of them picked, so the global batch has one shape."""
        schema = self.dataset.schema
        out = dict(batch)
        for name, value in [*schema.sequences.items(), *((m, 0) for m in schema.masks)]:
            seq = np.asarray(batch[name])
            extra = length - seq.shape[-1]
            if extra < 0:
                raise ValueError(f"cannot pad {name!r} of length {seq.shape[-1]} to {length}")
            if extra:
                widths = [(0, 0)] * (seq.ndim - 1) + [(extra, 0) if self.pad_side == "left" else (0, extra)]
                out[name] = np.pad(seq, widths, constant_values=value)
        return out

    # -- reporting / cleanup
    @property
    def report(self):
        return self.dataset.report

    def summary(self) -> str:
        return self.dataset.report.summary()

    def _close_gen(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def close(self) -> None:
        self._close_gen()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
