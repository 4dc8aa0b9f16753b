"""Training checkpoints: orbax `CheckpointManager`, asynchronous, every N steps, keep K,
plus one at a preemption. A checkpoint holds the train state (trainable params, optimiser
state, step, RNG, extras) and every process's loader state. orbax commits a step only once
it is fully written, so a half-written checkpoint is never taken as latest.

Preemption (SIGTERM) must stop every host at the same step, or the hosts that go on wait
forever in the next step's collectives. With several processes, JAX's preemption service
(started by `jax.distributed.initialize`) catches the signal on whichever host gets it and
the hosts agree on one step to save at (`CheckpointManager.reached_preemption`). A single
process catches SIGTERM itself and stops after the current step.
"""
from __future__ import annotations

import json
import os
import signal
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax import sharding


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        # The interval is decided here (`due`), not by orbax: every save is explicit.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._multi = jax.process_count() > 1
        self._signalled = False
        self._previous = None
        if not self._multi:  # several processes: JAX's preemption service owns SIGTERM
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True  # finish the current step, save, then leave the loop

    def should_stop(self, step: int) -> bool:
        """True at the step where every process saves and stops after a preemption notice.
        Call it at every step, on every process, from the same start step."""
        if self._multi:
            return self.manager.reached_preemption(step)
        return self._signalled

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loader_state: Callable[[], dict], *, force: bool = False) -> bool:
        """Saves `state` at `step` when due (or forced); `loader_state()` (this process's) is
        gathered from every process only then."""
        if not (force or self.due(step)):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  loader=ocp.args.JsonSave({"processes": gather_loader_states(loader_state())}))
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, list[dict]]:
        """State restored with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["loader"]["processes"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def gather_loader_states(local: dict) -> list[dict]:
    """Every process's loader state (each resumes its own shard), as JSON bytes over the hosts."""
    if jax.process_count() == 1:
        return [local]
    encoded = json.dumps(local).encode()
    size = sharding.max_over_processes(len(encoded))
    gathered = sharding.gather_processes(np.frombuffer(encoded.ljust(size, b" "), np.uint8))
    return [json.loads(bytes(row).decode().strip()) for row in gathered]