"""The SFT and RM training loop (`run_train`): data, the jitted step from train/setup.py,
held-out RM evaluation, and the exported model or adapter at the end. The PPO loop is in
rl/loop.py; what both share is in train/setup.py.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import sharding
from llava_jax.models import lora as lora_lib
from llava_jax.train import setup as run_setup
from llava_jax.models import trainable
from llava_jax.train.optim import make_optimizer
from llava_jax.settings import RunSettings, validate
from llava_jax.train.state import ModelSpec, TrainState


def build_data(s: RunSettings, config: Any) -> tuple[Any, Any | None, Any]:
    """(train loader, eval loader or None, tokenizer); each process reads its own shard."""
    from llava_jax.data import (Loader, PreferenceDataset, SFTDataset, default_buckets, load_captions,
                                load_tokenizer, vision_kwargs)
    from llava_jax.data.reward_prompt import DEFAULT_PROMPT_FILE, RewardPrompt, encode_reward_input

    d = s.data
    tokenizer = load_tokenizer(d.tokenizer)
    common = dict(image_folder=d.image_folder, template=d.template, max_length=d.max_length, strict=d.strict,
                  **vision_kwargs(config))
    if s.stage == "sft":
        dataset = SFTDataset(d.train, tokenizer, **common)
    else:
        prompt = RewardPrompt.from_file(s.rm.prompt_file or DEFAULT_PROMPT_FILE)
        encode = functools.partial(_reward_encode, tokenizer=tokenizer, prompt=prompt, config=config,
                                   template=d.template, encode_reward_input=encode_reward_input)
        captions = load_captions(d.captions) if s.rm.with_facts else None
        dataset = PreferenceDataset(d.train, tokenizer, captions=captions, encode_fn=encode, seed=s.seed, **common)
    eval_dataset = None
    if d.eval_size > 0:
        order = np.random.default_rng(s.seed).permutation(len(dataset))
        eval_dataset = dataset.subset(sorted(order[:d.eval_size].tolist()), split="held out")
        dataset = dataset.subset(sorted(order[d.eval_size:].tolist()))
    per_process = s.train.batch_size // jax.process_count()
    buckets = default_buckets(d.max_length, d.num_buckets)
    loader = Loader(dataset, per_process, seed=s.seed, buckets=buckets, num_workers=d.workers, pad_side="right")
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = Loader(eval_dataset, per_process, shuffle=False, num_epochs=1, drop_remainder=False,
                             buckets=buckets, num_workers=d.workers, pad_side="right")
    return loader, eval_loader, tokenizer


def _reward_encode(turns, captions, n_image, *, tokenizer, prompt, config, template, encode_reward_input):
    return encode_reward_input(turns, captions, tokenizer, prompt, num_image_tokens=n_image,
                               image_token_index=config.image_token_index, template=template)


def evaluate(state: TrainState, frozen: dict, loader: Any, mesh: Any, eval_fn: Any) -> dict:
    """Pair-weighted held-out metrics of the reward model over one pass of `loader`: each
    batch's global means weigh by its global count of real pairs (every process agrees)."""
    sums: dict[str, float] = {}
    count = 0.0
    loader.restore({**loader.state(), "epoch": 0, "position": 0})
    for batch in loader:
        batch = sharding.batch_to_device(run_setup.agree_length(batch, loader), mesh)
        metrics, pairs = jax.device_get(eval_fn(state.params, frozen, batch))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * float(pairs)
        count += float(pairs)
    return {f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()} | {"eval_pairs": count}


def _rm_eval_with_pairs(spec: ModelSpec, centering: float, params: dict, frozen: dict, batch: dict):
    from llava_jax.train.rm import rm_eval

    return rm_eval(spec, params, frozen, batch, centering=centering), jnp.sum(batch["valid"])


def run_train(s: RunSettings) -> dict:
    """Trains an SFT or RM stage as configured; returns the last logged metrics (plus eval)."""
    from llava_jax.train.metrics import mfu, peak_flops, transformer_train_flops

    validate(s, jax.process_count(), jax.device_count())
    mesh = run_setup.make_mesh(s)
    rng = jax.random.PRNGKey(s.seed)
    config, base, start_adapter = run_setup.load_model(s, mesh)
    spec, params_shape, frozen, make_params, make_args = run_setup.trainable_builder(s, config, base, start_adapter,
                                                                                    rng)
    loader, eval_loader, _ = build_data(s, config)
    steps = run_setup.total_steps(s, loader)
    optimizer, schedule = make_optimizer(s.optim, steps)
    state_shape = run_setup.abstract_state(s, params_shape, optimizer)
    state_sh = run_setup.state_shardings(state_shape, mesh, run_setup.params_logical(config, params_shape))
    frozen_sh = run_setup.frozen_shardings(config, frozen, mesh)
    frozen = run_setup.place(frozen, frozen_sh)
    ckpt = run_setup.open_checkpoints(s)
    state, _, loader_state, latest = run_setup.init_or_restore(s, ckpt, make_params, make_args, optimizer,
                                                               state_shape, state_sh)
    if loader_state is not None:
        loader.restore(loader_state)
    llm_params = sum(x.size for x in jax.tree_util.tree_leaves(base["llm"]))
    peak = s.log.peak_tflops * 1e12 or peak_flops(jax.devices()[0].device_kind)
    del make_args, base, start_adapter
    step_fn = run_setup.jit_train_step(s, spec, optimizer, schedule, state_sh, frozen_sh)
    eval_fn = None
    if s.stage == "rm" and eval_loader is not None:
        eval_fn = jax.jit(functools.partial(_rm_eval_with_pairs, spec, s.rm.centering))

    count_tokens = jax.jit(jnp.sum)

    def derive(metrics: dict) -> dict:  # host-side figures from the step's wall time
        out = {**metrics, "tokens_per_s": metrics["tokens"] / metrics["step_seconds"]}
        if peak:  # unknown on CPU
            flops = transformer_train_flops(llm_params, int(metrics["tokens"]), config.text.num_layers,
                                            config.text.hidden_size, int(metrics["seq_len"]),
                                            lora=spec.lora is not None)
            out["mfu"] = mfu(flops, metrics["step_seconds"], peak, jax.device_count())
        return out

    start = latest or 0
    tail = run_setup.StepTail(s, ckpt, steps=steps, start=start, desc=s.stage, bar_loss="loss", derive=derive)
    with jax.set_mesh(mesh), sharding.activation_rules():  # set_mesh: flax sees the mesh (activation constraints)
        for step in range(start + 1, steps + 1):
            batch = sharding.batch_to_device(run_setup.agree_length(next(loader), loader), mesh)
            host = {"seq_len": float(batch["input_ids"].shape[-1])}
            state, metrics = step_fn(state, frozen, batch)
            metrics = {**metrics, "tokens": count_tokens(batch["attention_mask"])}  # global, fetched a step late
            if eval_fn is not None and (step % s.rm.eval_every == 0 or step == steps):
                host.update(evaluate(state, frozen, eval_loader, mesh, eval_fn))
            if tail.end_step(step, metrics, host, {"train": state, "extras": {}}, loader):
                break
    last = tail.close()
    loader.close()
    if not tail.preempted:  # also a rerun that found the last step checkpointed: export what it restored
        export_result(s, spec, state, frozen)
    if jax.process_index() == 0:
        print(loader.summary())
    return last


def export_result(s: RunSettings, spec: ModelSpec, state: TrainState, frozen: dict) -> str | None:
    """The trained model for the next stage: `workdir/model`, a model checkpoint with the
    trained base parts folded in; for LoRA stages `workdir/adapter`, laid out as
    CKPT/adapters/NAME (with the reward head for the RM): copy it into the base checkpoint's
    adapters/ to use it. Single-process: a multi-host run is exported by rerunning its
    command as one process, which restores the final checkpoint and exports."""
    from llava_jax.models.weights import save_checkpoint, write_adapter_dir

    if jax.process_count() > 1:
        print("export of the trained model is single-process: rerun this command as one process (one host) and it "
              "restores the final checkpoint and exports")
        return None
    params = state.params
    if "base" in params:  # trained base parts (lora+projector too: the projector goes with its base)
        # cast in place on the devices (each shard stays where it is), then written shard by shard
        dtype = jnp.dtype(s.model.param_dtype)
        trained_sh = jax.tree_util.tree_map(lambda x: x.sharding, params["base"])
        trained = jax.jit(lambda t: trainable.cast_tree(t, dtype), out_shardings=trained_sh)(params["base"])
        base = trainable.join_base(trained, frozen)
        model_path = os.path.join(s.workdir, "model")
        save_checkpoint(model_path, spec.config, base, overwrite=True, extra={"trained_by": s.stage})
        del trained, base
        if "adapter" not in params:
            return model_path
        print(f"lora+projector: the base with the trained projector is {model_path}; use it with the adapter")
    path = os.path.join(s.workdir, "adapter")
    kind = "reward" if s.stage == "rm" else None
    host = jax.device_get({k: v for k, v in params.items() if k != "base"})  # adapter-sized
    write_adapter_dir(path, lora_lib.Adapter(host["adapter"], spec.lora), host.get("head") if kind else None, kind,
                      overwrite=True, extra={"trained_by": s.stage})
    return path
