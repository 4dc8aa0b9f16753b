"""Training checkpoints: orbax `CheckpointManager`, asynchronous, every N steps, keep K,
plus one on SIGTERM (TPU preemption). A checkpoint holds the train state (trainable
params, optimiser state, step, RNG) and every process's loader state. orbax commits a step
only once it is fully written, so a half-written checkpoint is never taken as latest.
"""
from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.preempted = False
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        # Finish the current step, save, then exit from the training loop.
        self.preempted = True

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loader_states: list[dict], *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  loader=ocp.args.JsonSave({"processes": loader_states}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, list[dict]]:
        """State restored with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["loader"]["processes"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        signal.signal(signal.SIGTERM, self._previous)


def gather_loader_states(local: dict) -> list[dict]:
    """Every process's loader state (each resumes its own shard); JSON over process_allgather."""
    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils
    import numpy as np

    encoded = json.dumps(local).encode()
    size = np.asarray(multihost_utils.process_allgather(np.asarray([len(encoded)]))).max()
    padded = np.frombuffer(encoded.ljust(int(size), b" "), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row).decode().strip()) for row in gathered.reshape(jax.process_count(), -1)]
