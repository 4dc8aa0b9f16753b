"""The training driver behind `scripts/train.py`: config checks, model and data set-up,
sharded jitted steps, the Python loop, checkpoints and metrics. `run_stage(config)`
runs any stage after the configs it `requires`; SFT and RM train in `run` here (their
step functions live in sft.py / rm.py), PPO in ppo_trainer.py.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import heads, lora as lora_lib, sharding, trainable
from llava_jax.checkpoint import Checkpointer, gather_loader_states
from llava_jax.optim import OptimConfig, make_optimizer
from llava_jax.train_state import ModelSpec, TrainState, create_state

STAGES = ("sft", "rm", "ppo")
TRAINABLE = ("projector", "projector+llm", "lora", "lora+projector")


def load_config_file(path: str) -> Any:
    """`get_config()` of a config file (as `--config FILE` does, without overrides)."""
    import importlib.util

    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_llava_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def unknown_field(cfg: Any, dotted: str) -> str | None:
    """None when `dotted` (e.g. "train.batch_size") names a config field; else a one-line
    error naming it and the closest valid fields."""
    import difflib

    node = cfg
    for key in dotted.split("."):
        if not hasattr(node, "keys") or key not in node:
            fields = []

            def walk(tree, prefix):
                for name in tree.keys():
                    if hasattr(tree[name], "keys"):
                        walk(tree[name], prefix + name + ".")
                    else:
                        fields.append(prefix + name)
            walk(cfg, "")
            close = difflib.get_close_matches(dotted, fields, n=3, cutoff=0.5)
            return (f"--config.{dotted}: no such config field"
                    + (f"; closest: {', '.join(close)}" if close else ""))
        node = node[key]
    return None


def exported_result(cfg: Any) -> str | None:
    """The model or adapter a finished run of `cfg` left in its workdir, if any."""
    for name in ("model", "adapter"):
        path = os.path.join(cfg.workdir, name)
        if os.path.isdir(path):
            return path
    return None


def run_requirements(cfg: Any, _seen: tuple[str, ...] = ()) -> None:
    """Runs each config in `cfg.requires` (and its own requirements first) whose workdir has
    no exported result yet: `tiny_ppo` needs a tiny SFT model and a tiny reward model."""
    for path in (p.strip() for p in cfg.get("requires", "").split(",") if p.strip()):
        if path in _seen:
            raise ValueError(f"config.requires: cycle through {path}")
        required = load_config_file(path)
        if exported_result(required) is not None:
            continue
        run_requirements(required, (*_seen, path))
        if jax.process_index() == 0:
            print(f"requirement {path}: no result in {required.workdir} yet, running it first")
        run_stage(required)
        if exported_result(required) is None:
            raise ValueError(f"requirement {path} finished without writing {required.workdir}/model or /adapter")


def run_stage(cfg: Any) -> dict:
    """Trains the stage `cfg.stage` names (after its requirements)."""
    run_requirements(cfg)
    if cfg.stage == "ppo":
        from llava_jax.ppo_trainer import run_ppo

        return run_ppo(cfg)
    return run(cfg)


def validate(cfg: Any) -> None:
    """Everything that can be checked before touching a device, with one clear error each."""
    if cfg.stage not in STAGES:
        raise ValueError(f"config.stage={cfg.stage!r}: expected one of {STAGES}")
    if cfg.train.trainable not in TRAINABLE:
        raise ValueError(f"config.train.trainable={cfg.train.trainable!r}: expected one of {TRAINABLE}")
    if cfg.stage == "rm" and not cfg.train.trainable.startswith("lora"):
        raise ValueError("config.train.trainable: the reward model trains a LoRA adapter (lora or lora+projector)")
    for name in ("train", "tokenizer"):
        path = cfg.data[name]
        if not path or not os.path.exists(path):
            raise ValueError(f"config.data.{name}={path!r} does not exist")
    if cfg.data.image_folder and not os.path.isdir(cfg.data.image_folder):
        raise ValueError(f"config.data.image_folder={cfg.data.image_folder!r} is not a directory")
    if cfg.stage == "rm" and cfg.rm.with_facts and not os.path.isfile(cfg.data.captions):
        raise ValueError(f"config.data.captions={cfg.data.captions!r}: rm.with_facts needs the captions file")
    if cfg.model.init != "tiny" and not os.path.isdir(cfg.model.init):
        raise ValueError(f"config.model.init={cfg.model.init!r}: expected 'tiny' or a checkpoint directory")
    if cfg.train.batch_size <= 0 or cfg.train.batch_size % (cfg.train.grad_accum * jax.process_count()):
        raise ValueError(f"config.train.batch_size={cfg.train.batch_size} must divide into grad_accum="
                         f"{cfg.train.grad_accum} x {jax.process_count()} processes")
    if cfg.stage == "rm" and cfg.train.grad_accum != 1:
        raise ValueError(f"config.train.grad_accum={cfg.train.grad_accum}: the RM step takes whole batches (its "
                         "centering term is a batch mean); lower train.batch_size or use more devices instead")
    OptimConfig(schedule=cfg.optim.schedule)  # schedule name check
    sharding.mesh_shape((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), jax.device_count())


def runtime_knobs(cfg: Any) -> dict[str, str]:
    """The model's runtime knobs from the config (LlavaConfig.with_runtime)."""
    return dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat_policy=cfg.model.remat,
                attention=cfg.model.attention)


def load_model(cfg: Any) -> tuple[Any, dict, lora_lib.Adapter | None]:
    from llava_jax.model_ckpt import load_adapter, load_checkpoint
    from llava_jax.models.llava import init_params, tiny_config

    runtime = runtime_knobs(cfg)
    if cfg.model.init == "tiny":
        config = tiny_config(**runtime)
        base = init_params(config, jax.random.PRNGKey(cfg.seed))
        base = trainable.cast_tree(base, jnp.dtype(cfg.model.param_dtype))
    else:
        config, base = load_checkpoint(cfg.model.init, dtype=cfg.model.param_dtype)
        config = config.with_runtime(**runtime)
    adapter = load_adapter(cfg.model.init, cfg.model.adapter)[0] if cfg.model.adapter else None
    return config, base, adapter


def split_trainable(cfg: Any, config: Any, base: dict, start_adapter: lora_lib.Adapter | None,
                    rng: jax.Array) -> tuple[ModelSpec, dict, dict]:
    """(spec, trainable params (float32), frozen base) for config.train.trainable."""
    mode = cfg.train.trainable
    parts = {"projector": ["projector"], "projector+llm": ["projector", "llm"], "lora": [],
             "lora+projector": ["projector"]}[mode]
    train_base, frozen = trainable.split_base(base, parts)
    params: dict = {}
    if train_base:
        params["base"] = trainable.cast_tree(train_base, jnp.float32)
    spec = ModelSpec(config)
    if mode.startswith("lora"):
        if start_adapter is not None:
            adapter = start_adapter
        else:
            targets = tuple(t.strip() for t in cfg.train.lora_targets.split(",") if t.strip())
            lcfg = lora_lib.LoraConfig(rank=cfg.train.lora_rank, alpha=cfg.train.lora_alpha,
                                       dropout=cfg.train.lora_dropout, targets=targets)
            adapter = lora_lib.init_adapter(base, lcfg, jax.random.fold_in(rng, 1))
        params["adapter"] = trainable.cast_tree(adapter.params, jnp.float32)
        spec = ModelSpec(config, adapter.config)
    if cfg.stage == "rm":
        params["head"] = heads.init_head("reward", config.text.hidden_size, jax.random.fold_in(rng, 2))
    return spec, params, frozen


def params_logical(config: Any, params: dict) -> dict:
    """Logical PartitionSpecs of the trainable tree (base parts, adapter, head)."""
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


def state_shardings(config: Any, state_shape: TrainState, mesh: Any, logical: Any = None) -> TrainState:
    """Params by their logical axes (default: those of an SFT/RM trainable tree);
    optimiser moments like the params they follow."""
    logical = params_logical(config, state_shape.params) if logical is None else logical
    param_sh = sharding.shardings_for(state_shape.params, logical, mesh)
    by_path = {tuple(str(k) for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def opt_sharding(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            if keys[i:] in by_path:  # mu/nu/... of a param: same shape, same placement
                return by_path[keys[i:]]
        return sharding.replicated(mesh)

    opt_sh = jax.tree_util.tree_map_with_path(opt_sharding, state_shape.opt_state)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)


def frozen_shardings(config: Any, frozen: dict, mesh: Any) -> dict:
    from llava_jax.models.llava import logical_axes

    axes = logical_axes(config)
    pruned = jax.tree_util.tree_map(lambda _: None, frozen)

    def pick(node, ax):
        return {k: pick(v, ax[k]) if isinstance(v, dict) else ax[k] for k, v in node.items()}
    return sharding.shardings_for(frozen, pick(pruned, axes), mesh)


def build_data(cfg: Any, config: Any) -> tuple[Any, Any | None, Any]:
    """(train loader, eval loader or None, tokenizer); each process reads its own shard."""
    from llava_jax.data import (Loader, PreferenceDataset, SFTDataset, default_buckets, load_captions,
                                load_tokenizer, vision_kwargs)
    from llava_jax.reward_prompt import DEFAULT_PROMPT_FILE, RewardPrompt, encode_reward_input

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    common = dict(image_folder=cfg.data.image_folder, template=cfg.data.template, max_length=cfg.data.max_length,
                  strict=cfg.data.strict, **vision_kwargs(config))
    if cfg.stage == "sft":
        dataset = SFTDataset(cfg.data.train, tokenizer, **common)
    else:
        prompt = RewardPrompt.from_file(cfg.rm.prompt_file or DEFAULT_PROMPT_FILE)
        encode = functools.partial(_reward_encode, tokenizer=tokenizer, prompt=prompt, config=config,
                                   template=cfg.data.template, encode_reward_input=encode_reward_input)
        captions = load_captions(cfg.data.captions) if cfg.rm.with_facts else None
        dataset = PreferenceDataset(cfg.data.train, tokenizer, captions=captions, encode_fn=encode, seed=cfg.seed,
                                    **common)
    eval_dataset = None
    if cfg.data.eval_size > 0:
        order = np.random.default_rng(cfg.seed).permutation(len(dataset.items))
        held = set(order[:cfg.data.eval_size].tolist())
        eval_dataset = copy.copy(dataset)
        eval_dataset.items = [it for i, it in enumerate(dataset.items) if i in held]
        dataset.items = [it for i, it in enumerate(dataset.items) if i not in held]
    per_process = cfg.train.batch_size // jax.process_count()
    buckets = default_buckets(cfg.data.max_length, cfg.data.num_buckets)
    loader = Loader(dataset, per_process, seed=cfg.seed, buckets=buckets, num_workers=cfg.data.workers,
                    pad_side="right")
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = Loader(eval_dataset, per_process, shuffle=False, num_epochs=1, drop_remainder=False,
                             buckets=buckets, num_workers=cfg.data.workers, pad_side="right")
    return loader, eval_loader, tokenizer


def _reward_encode(turns, captions, n_image, *, tokenizer, prompt, config, template, encode_reward_input):
    return encode_reward_input(turns, captions, tokenizer, prompt, num_image_tokens=n_image,
                               image_token_index=config.image_token_index, template=template)


def to_device(batch: dict, mesh: Any) -> dict:
    """Process-local host arrays -> global arrays sharded over (data, fsdp) on the batch axis."""
    out = {}
    for key, value in batch.items():
        if key == "meta":
            continue
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim), value)
    return out


def agree_length(batch: dict, loader: Any) -> dict:
    """Pads this process's batch to the longest sequence bucket of any process: each process
    buckets only its own rows, but the global batch needs one shape everywhere (the 1-process
    run would have picked that same bucket for the whole batch)."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    length = batch["input_ids"].shape[-1]
    longest = int(np.max(multihost_utils.process_allgather(np.asarray([length], np.int32))))
    return loader.pad_to(batch, longest) if longest > length else batch


def total_steps(cfg: Any, loader: Any) -> int:
    if cfg.train.max_steps > 0:
        return int(cfg.train.max_steps)
    return max(1, int(math.ceil(cfg.train.num_epochs * loader.steps_per_epoch())))


def make_step(cfg: Any, spec: ModelSpec, optimizer: Any, schedule: Any, state_sh: Any, frozen_sh: Any):
    """The stage's step, jitted with explicit in/out shardings; the state is donated."""
    from llava_jax.rm import rm_step
    from llava_jax.sft import sft_step

    if cfg.stage == "sft":
        fn = functools.partial(sft_step, spec, optimizer, schedule, grad_accum=cfg.train.grad_accum)
    else:
        fn = functools.partial(rm_step, spec, optimizer, schedule, centering=cfg.rm.centering)
    return jax.jit(fn, in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))


def evaluate(state: TrainState, frozen: dict, loader: Any, mesh: Any, eval_fn: Any) -> dict:
    """Pair-weighted held-out metrics of the reward model over one pass of `loader`."""
    sums: dict[str, float] = {}
    count = 0.0
    loader.restore({**loader.state(), "epoch": 0, "position": 0})
    for batch in loader:
        batch = agree_length(batch, loader)
        n = float(np.sum(batch["valid"]))
        metrics = jax.device_get(eval_fn(state.params, frozen, to_device(batch, mesh)))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()} | {"eval_pairs": count}


def run(cfg: Any) -> dict:
    """Trains one stage as configured; returns the last logged metrics (plus eval)."""
    from llava_jax.metrics import MetricsWriter, ProgressBar, mfu, peak_flops, transformer_train_flops
    from llava_jax.rm import rm_eval

    validate(cfg)
    mesh = sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    rng = jax.random.PRNGKey(cfg.seed)
    config, base, start_adapter = load_model(cfg)
    spec, params, frozen = split_trainable(cfg, config, base, start_adapter, rng)
    loader, eval_loader, _ = build_data(cfg, config)
    steps = total_steps(cfg, loader)
    optim_cfg = OptimConfig(**{k: cfg.optim[k] for k in cfg.optim.keys()})
    optimizer, schedule = make_optimizer(optim_cfg, steps)

    state_shape = jax.eval_shape(lambda p: create_state(p, optimizer, rng), params)
    state_sh = state_shardings(config, state_shape, mesh)
    frozen_sh = frozen_shardings(config, frozen, mesh)
    frozen = jax.device_put(frozen, frozen_sh)
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), every=cfg.checkpoint.every,
                        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step() if cfg.resume else None
    if latest is not None:
        abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          state_shape, state_sh)
        state, loader_states = ckpt.restore(latest, abstract)
        loader.restore(loader_states[jax.process_index()])
    else:
        state = jax.jit(lambda p: create_state(p, optimizer, rng), out_shardings=state_sh)(params)
    llm_params = sum(x.size for x in jax.tree_util.tree_leaves(base["llm"]))
    peak = cfg.log.peak_tflops * 1e12 or peak_flops(jax.devices()[0].device_kind)
    del params, base
    step_fn = make_step(cfg, spec, optimizer, schedule, state_sh, frozen_sh)
    eval_fn = jax.jit(functools.partial(rm_eval, spec, centering=cfg.rm.centering)) if cfg.stage == "rm" else None

    writer = MetricsWriter(cfg.workdir, process_index=jax.process_index(), tensorboard=cfg.log.tensorboard,
                           resume_step=latest)
    start = int(jax.device_get(state.step))
    bar = ProgressBar(steps, initial=start, process_index=jax.process_index(), desc=cfg.stage)
    last: dict = {}
    with jax.set_mesh(mesh), sharding.activation_rules():  # set_mesh: flax sees the mesh (activation constraints)
        for step in range(start + 1, steps + 1):
            batch = agree_length(next(loader), loader)
            tokens = float(np.sum(batch["attention_mask"])) * jax.process_count()
            begin = time.perf_counter()
            state, metrics = step_fn(state, frozen, to_device(batch, mesh))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - begin
            metrics.update(tokens_per_s=tokens / seconds, step_seconds=seconds)
            if peak:  # unknown on CPU
                flops = transformer_train_flops(llm_params, int(tokens), config.text.num_layers, config.text.hidden_size,
                                                batch["input_ids"].shape[-1], lora=spec.lora is not None)
                metrics["mfu"] = mfu(flops, seconds, peak, jax.device_count())
            if eval_fn is not None and eval_loader is not None and (step % cfg.rm.eval_every == 0 or step == steps):
                metrics.update(evaluate(state, frozen, eval_loader, mesh, eval_fn))
            if step % cfg.log.every == 0 or step == steps:
                writer.write(step, metrics)
            bar.update(step, loss=metrics["loss"], tokens_per_second=metrics["tokens_per_s"])
            last = {"step": step, **metrics}
            ckpt.save(step, state, gather_loader_states(loader.state()), force=step == steps or ckpt.preempted)
            if ckpt.preempted:
                print(f"SIGTERM: saved step {step}, exiting")
                break
    ckpt.close()
    writer.close()
    bar.close()
    loader.close()
    if not ckpt.preempted and last.get("step") == steps:
        export_result(cfg, spec, state, frozen)
    if jax.process_index() == 0:
        print(loader.summary())
    return last


def export_result(cfg: Any, spec: ModelSpec, state: TrainState, frozen: dict) -> str | None:
    """The trained model for the next stage: `workdir/model`, a model checkpoint with the
    trained base parts folded in; for LoRA stages `workdir/adapter`, laid out as
    CKPT/adapters/NAME (with the reward head for the RM): copy it into the base checkpoint's
    adapters/ to use it. Single-process runs only for now."""
    from llava_jax.model_ckpt import save_checkpoint, write_adapter_dir

    if jax.process_count() > 1:
        print("export of the trained model is single-process only; use the last checkpoint in workdir/checkpoints")
        return None
    params = jax.device_get(state.params)
    if "adapter" not in params:
        dtype = jnp.dtype(cfg.model.param_dtype)
        base = trainable.join_base(trainable.cast_tree(params["base"], dtype), jax.device_get(frozen))
        path = os.path.join(cfg.workdir, "model")
        save_checkpoint(path, spec.config, jax.tree_util.tree_map(np.asarray, base), overwrite=True,
                        extra={"trained_by": cfg.stage})
        return path
    if "base" in params:
        print("note: the projector trained by a lora+projector run stays in workdir/checkpoints")
    path = os.path.join(cfg.workdir, "adapter")
    kind = "reward" if cfg.stage == "rm" else None
    write_adapter_dir(path, lora_lib.Adapter(params["adapter"], spec.lora), params.get("head") if kind else None, kind,
                      overwrite=True, extra={"trained_by": cfg.stage})
    return path
