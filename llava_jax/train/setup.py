"""What the SFT/RM loop (train/loop.py), the PPO loop (rl/loop.py) and the compile check
share: the model and its trainable split, shardings of params / optimiser state / batches,
the jitted SFT and RM steps, checkpoint restore, and `StepTail` (what ends every step:
metrics written one step late, progress, checkpoints, the preemption every host agrees on).
Each piece of glue exists here once; the PPO-only layout is in rl/setup.py.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import sharding
from llava_jax.models import heads, lora as lora_lib
from llava_jax.models import trainable
from llava_jax.train.checkpoint import Checkpointer
from llava_jax.settings import RunSettings
from llava_jax.train.state import ModelSpec, TrainState, create_state


def make_mesh(s: RunSettings) -> Any:
    return sharding.make_mesh(s.mesh.shape)


def load_model(s: RunSettings, mesh: Any) -> tuple[Any, dict, lora_lib.Adapter | None]:
    """(config with the run's runtime knobs, base params, starting adapter or None), each leaf
    made or restored straight into its shards over `mesh`."""
    from llava_jax.models.weights import load_adapter, load_checkpoint
    from llava_jax.models.llava import init_params, tiny_config

    runtime = s.model.runtime_knobs()
    if s.model.init == "tiny":
        config = tiny_config(**runtime)
        dtype, rng = jnp.dtype(s.model.param_dtype), jax.random.PRNGKey(s.seed)
        base = made_in_shards(lambda: trainable.cast_tree(init_params(config, rng), dtype),
                              lambda shapes: sharding.param_shardings(config, shapes, mesh))
    else:
        config, base = load_checkpoint(s.model.init, dtype=s.model.param_dtype, mesh=mesh)
        config = config.with_runtime(**runtime)
    adapter = load_adapter(s.model.init, s.model.adapter, mesh=mesh)[0] if s.model.adapter else None
    return config, base, adapter


def made_in_shards(make: Callable[[], Any], shardings_of: Callable[[Any], Any]) -> Any:
    """`make()` (a traceable initialiser) run inside a jit whose outputs are laid out by
    `shardings_of(shapes)`: fresh trees land in their shards, never whole on one device."""
    return jax.jit(make, out_shardings=shardings_of(jax.eval_shape(make)))()


def split_trainable(s: RunSettings, config: Any, base: dict, start_adapter: lora_lib.Adapter | None,
                    rng: jax.Array) -> tuple[ModelSpec, dict, dict]:
    """(spec, trainable params (float32), frozen base) for train.trainable; traceable: the
    loop builds the trainable params inside the jit that makes the train state
    (`init_or_restore`), the compile check runs it under eval_shape."""
    train_base, frozen = trainable.split_base(base, s.train.trainable_parts)
    params: dict = {}
    if train_base:
        params["base"] = trainable.cast_tree(train_base, jnp.float32)
    spec = ModelSpec(config)
    if s.train.uses_lora:
        adapter = start_adapter or lora_lib.init_adapter(base, s.train.lora_config(), jax.random.fold_in(rng, 1))
        params["adapter"] = trainable.cast_tree(adapter.params, jnp.float32)
        spec = ModelSpec(config, adapter.config)
    if s.stage == "rm":
        params["head"] = heads.init_head("reward", config.text.hidden_size, jax.random.fold_in(rng, 2))
    return spec, params, frozen


def trainable_builder(s: RunSettings, config: Any, base: dict, start_adapter: lora_lib.Adapter | None,
                      rng: jax.Array) -> tuple[ModelSpec, dict, dict, Callable[..., dict], tuple]:
    """(spec, trainable params' ShapeDtypeStructs, frozen base, make, make's arguments):
    `make(*args)` is the traceable function that builds the trainable params from the base
    and starting adapter, so the float32 casts and fresh adapters happen inside the jit that
    lays out the train state, never as whole arrays on one device."""
    lora = start_adapter.config if start_adapter is not None else None
    box: dict = {}

    def make(base_tree: dict, start_params: dict | None) -> dict:
        start = None if start_params is None else lora_lib.Adapter(start_params, lora)
        box["spec"], params, _ = split_trainable(s, config, base_tree, start, rng)
        return params

    args = (base, None if start_adapter is None else start_adapter.params)
    shapes = jax.eval_shape(make, *args)
    frozen = trainable.split_base(base, s.train.trainable_parts)[1]
    return box["spec"], shapes, frozen, make, args


# ---------------------------------------------------------------------------- shardings

def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (restore targets, compile arguments)."""
    return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def params_logical(config: Any, params: dict) -> dict:
    """Logical PartitionSpecs of an SFT/RM trainable tree (base parts, adapter, head)."""
    from jax.sharding import PartitionSpec
    from llava_jax.models.llava import logical_axes

    base_axes = logical_axes(config)
    out = {}
    if "base" in params:
        out["base"] = {k: base_axes[k] for k in params["base"]}
    if "adapter" in params:
        out["adapter"] = sharding.adapter_logical_axes(params["adapter"], base_axes)
    if "head" in params:
        out["head"] = jax.tree_util.tree_map(lambda _: PartitionSpec(), params["head"])
    return out


def state_shardings(state_shape: TrainState, mesh: Any, logical: Any) -> TrainState:
    """Params by their logical axes; optimiser moments like the params they follow (a moment
    whose path ends with a param's path has its shape); counts replicated."""
    param_sh = sharding.shardings_for(state_shape.params, logical, mesh)
    by_path = {tuple(str(k) for k in p): sh for p, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    rep = sharding.replicated(mesh)

    def opt_sharding(path, _):
        keys = tuple(str(k) for k in path)
        return next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), rep)

    opt_sh = jax.tree_util.tree_map_with_path(opt_sharding, state_shape.opt_state)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)


def frozen_shardings(config: Any, frozen: dict, mesh: Any) -> dict:
    """Shardings of a (partial) base tree by the model's logical axes."""
    from llava_jax.models.llava import logical_axes

    def pick(node, ax):
        return {k: pick(v, ax[k]) if isinstance(v, dict) else ax[k] for k, v in node.items()}
    return sharding.shardings_for(frozen, pick(frozen, logical_axes(config)), mesh)


def place(tree: Any, shardings: Any) -> Any:
    """`tree` (host arrays, or arrays of this process's devices, the same on every process)
    laid out by `shardings`, which may span several processes: each process puts only its
    own shards on its devices (no cross-host transfer, no equality check per leaf)."""
    def put(x, sh):
        if isinstance(x, jax.Array) and x.sharding == sh:
            return x
        if sh.is_fully_addressable:
            return jax.device_put(x, sh)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])
    return jax.tree_util.tree_map(put, tree, shardings)


def agree_length(batch: dict, loader: Any) -> dict:
    """Pads this process's batch to the longest sequence bucket of any process: each process
    buckets only its own rows, but the global batch needs one shape everywhere (the 1-process
    run would have picked that same bucket for the whole batch)."""
    length = batch["input_ids"].shape[-1]
    longest = sharding.max_over_processes(length)
    return loader.pad_to(batch, longest) if longest > length else batch


# ------------------------------------------------------------------------------ steps

def total_steps(s: RunSettings, loader: Any) -> int:
    if s.train.max_steps > 0:
        return int(s.train.max_steps)
    return max(1, int(math.ceil(s.train.num_epochs * loader.steps_per_epoch())))


def jit_train_step(s: RunSettings, spec: ModelSpec, optimizer: Any, schedule: Any, state_sh: Any,
                   frozen_sh: Any) -> Callable:
    """The SFT or RM step, jitted with explicit in/out shardings; the state is donated."""
    from llava_jax.train.rm import rm_step
    from llava_jax.train.sft import sft_step

    if s.stage == "sft":
        fn = functools.partial(sft_step, spec, optimizer, schedule, grad_accum=s.train.grad_accum)
    else:
        fn = functools.partial(rm_step, spec, optimizer, schedule, centering=s.rm.centering)
    return jax.jit(fn, in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))


def open_checkpoints(s: RunSettings) -> Checkpointer:
    return Checkpointer(os.path.join(s.workdir, "checkpoints"), every=s.checkpoint.every, keep=s.checkpoint.keep,
                        async_save=s.checkpoint.async_save)


def abstract_state(s: RunSettings, params: dict, optimizer: Any) -> TrainState:
    """ShapeDtypeStructs of the train state `init_or_restore` builds from `params` (arrays or
    ShapeDtypeStructs)."""
    return jax.eval_shape(lambda p: create_state(p, optimizer, jax.random.PRNGKey(s.seed)), params)


def init_or_restore(s: RunSettings, ckpt: Checkpointer, make_params: Callable[..., dict], args: tuple,
                    optimizer: Any, state_shape: TrainState, state_sh: TrainState, extras: dict | None = None
                    ) -> tuple[TrainState, dict, dict | None, int | None]:
    """(train state, extras, this process's loader state or None, restored step or None): the
    latest checkpoint when resuming, else a fresh state from `make_params(*args)` (traceable;
    run inside the jit that lays the state out over the mesh, so casts and fresh adapters
    land in their shards). `state_shape` is `abstract_state(...)`; `extras` are replicated
    float32 scalars kept beside the state (e.g. PPO's KL coefficient)."""
    extras = dict(extras or {})
    rng = jax.random.PRNGKey(s.seed)
    latest = ckpt.latest_step() if s.resume else None
    if latest is None:
        build = jax.jit(lambda *a: create_state(make_params(*a), optimizer, rng), out_shardings=state_sh)
        return build(*args), extras, None, None
    rep = sharding.replicated(jax.tree_util.tree_leaves(state_sh)[0].mesh)
    abstract = {"train": with_shardings(state_shape, state_sh),
                "extras": {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep) for k in extras}}
    restored, loader_states = ckpt.restore(latest, abstract)
    extras = {k: float(v) for k, v in restored["extras"].items()}
    return restored["train"], extras, loader_states[jax.process_index()], latest


class StepTail:
    """What ends every step of both loops, without making the device wait on the host:
    a step's metrics (device arrays) are fetched and written when the NEXT step has been
    dispatched, or at once when a checkpoint is due (the one sync point, with the loader
    states gathered across processes only then); checkpoints every N steps and at the end;
    and the preemption stop that every process agrees on (Checkpointer.should_stop)."""

    def __init__(self, s: RunSettings, ckpt: Checkpointer, *, steps: int, start: int, desc: str, bar_loss: str, derive: Callable[[dict], dict] | None = None):
        from llava_jax.train.metrics import MetricsWriter, ProgressBar

        self.s, self.ckpt, self.steps, self.bar_loss, self.derive = s, ckpt, steps, bar_loss, derive
        self.writer = MetricsWriter(s.workdir, process_index=jax.process_index(), tensorboard=s.log.tensorboard,
                                    resume_step=start)  # drops lines past the checkpoint: a step is never logged twice
        self.bar = ProgressBar(steps, initial=start, process_index=jax.process_index(), desc=desc)
        self.pending: tuple[int, Any, dict] | None = None
        self.last: dict = {}
        self.preempted = False
        self._last_end = time.perf_counter()

    def _flush(self) -> None:
        if self.pending is None:
            return
        step, on_device, on_host = self.pending
        self.pending = None
        metrics = {k: float(v) for k, v in jax.device_get(on_device).items()}
        metrics.update(on_host)
        if self.derive is not None:
            metrics = self.derive(metrics)
        if step % self.s.log.every == 0 or step == self.steps:
            self.writer.write(step, metrics)
        self.bar.update(step, loss=metrics.get(self.bar_loss), tokens_per_second=metrics.get("tokens_per_s"))
        self.last = {"step": step, **metrics}

    def end_step(self, step: int, on_device: dict, on_host: dict, save_tree: Any, loader: Any) -> bool:
        """Records step `step` (its metrics still on the device); checkpoints when due; True
        when the loop must stop (preemption, agreed by every process)."""
        now = time.perf_counter()  # one loop iteration: the step's time once the device sets the pace
        on_host = {"step_seconds": now - self._last_end, **on_host}
        self._last_end = now
        self._flush()  # the previous step's metrics: computed long ago, no wait
        self.pending = (step, on_device, on_host)
        stop = self.ckpt.should_stop(step)
        force = step == self.steps or stop
        if force or self.ckpt.due(step):
            self._flush()  # a checkpoint is a sync point anyway: its step's metrics are written with it
            self.ckpt.save(step, save_tree, loader.state, force=force)
        if stop:
            self.preempted = True
            print(f"process {jax.process_index()}: preemption: saved step {step}, exiting")
        return stop

    def close(self) -> dict:
        """Writes what is pending, waits for the checkpoints; the last step's metrics."""
        self._flush()
        self.ckpt.close()
        self.writer.close()
        self.bar.close()
        return self.last
