"""The PPO driver behind `scripts/train.py` for `stage = "ppo"`: roles set-up, then per PPO
step one rollout batch (rollout.py) and `ppo_epochs` passes of shuffled minibatch updates
(ppo.ppo_step), with checkpoints, metrics and the exported policy at the end.

A PPO step is one rollout batch; checkpoints are taken between steps and hold the
trainable params (policy adapter, value adapter + head), optimiser state, the KL
coefficient and the prompt loader's position; the rollout RNG is derived from the step, so
a run killed mid-rollout resumes to the same rollouts and metrics.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llava_jax import fact_reward, heads, lora as lora_lib, ppo, roles, sharding, trainable
from llava_jax.checkpoint import Checkpointer, gather_loader_states
from llava_jax.optim import OptimConfig, make_optimizer
from llava_jax.rollout import Rollouts, RolloutConfig, write_samples
from llava_jax.sampling import SamplingConfig
from llava_jax.train_state import create_state
from llava_jax.trainer import frozen_shardings, state_shardings


def validate_ppo(cfg: Any) -> None:
    """Every PPO-specific check that needs no device."""
    p = cfg.ppo
    if not p.reward_adapter or not os.path.isdir(p.reward_adapter):
        raise ValueError(f"config.ppo.reward_adapter={p.reward_adapter!r}: the reward model's adapter directory "
                         "(an RM run's workdir/adapter) does not exist")
    if p.policy_adapter and not os.path.isdir(p.policy_adapter):
        raise ValueError(f"config.ppo.policy_adapter={p.policy_adapter!r} does not exist ('' = fresh LoRA)")
    if p.reward_base and not os.path.isdir(p.reward_base):
        raise ValueError(f"config.ppo.reward_base={p.reward_base!r} does not exist ('' = model.init)")
    if p.with_facts and not os.path.isfile(cfg.data.captions):
        raise ValueError(f"config.data.captions={cfg.data.captions!r}: ppo.with_facts needs the captions file")
    if cfg.train.trainable != "lora":
        raise ValueError("config.train.trainable: PPO trains LoRA adapters (lora)")
    if cfg.train.lora_dropout:
        raise ValueError(f"config.train.lora_dropout={cfg.train.lora_dropout}: PPO runs its adapters without "
                         "dropout (the rollout's log-probs and the update must see one policy); set it to 0")
    procs = jax.process_count()
    if p.rollout_batch % p.step_batch or p.step_batch % (p.grad_accum * procs):
        raise ValueError(f"config.ppo: rollout_batch={p.rollout_batch} must be a multiple of step_batch="
                         f"{p.step_batch}, itself a multiple of grad_accum={p.grad_accum} x {procs} processes")
    chunk = p.rollout_chunk or p.rollout_batch
    if p.rollout_batch % chunk or chunk % procs:
        raise ValueError(f"config.ppo.rollout_chunk={chunk} must divide rollout_batch={p.rollout_batch} and be a "
                         f"multiple of {procs} processes")
    ppo.PPOHyper(kl_estimator=p.kl_estimator)
    if p.lr_schedule_unit not in ("rollout", "update"):
        raise ValueError(f"config.ppo.lr_schedule_unit={p.lr_schedule_unit!r}: expected 'rollout' or 'update'")
    if p.old_logprobs not in ("recompute", "sampler"):
        raise ValueError(f"config.ppo.old_logprobs={p.old_logprobs!r}: expected 'recompute' or 'sampler'")


def ppo_hyper(cfg: Any) -> ppo.PPOHyper:
    p = cfg.ppo
    return ppo.PPOHyper(clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef, gamma=p.gamma, lam=p.lam,
                        kl_estimator=p.kl_estimator, reward_scale=p.reward_scale, whiten_rewards=p.whiten_rewards,
                        whiten_over_pads=p.whiten_over_pads, loss_over_pads=p.loss_over_pads,
                        exact_ratio=p.old_logprobs == "recompute", grad_accum=p.grad_accum)


def ppo_optimizer(cfg: Any, steps: int) -> tuple[Any, Any]:
    """(optimiser, schedule) of a PPO run of `steps` PPO steps; the schedule advances per
    optimiser update or, as the original, per PPO step (`ppo.lr_schedule_unit`)."""
    p = cfg.ppo
    updates_per_step = p.ppo_epochs * (p.rollout_batch // p.step_batch)
    optim = OptimConfig(**{k: cfg.optim[k] for k in cfg.optim.keys()})
    if p.lr_schedule_unit == "rollout":
        return make_optimizer(optim, steps, updates_per_unit=updates_per_step)
    return make_optimizer(optim, steps * updates_per_step)


def question_mark_ids(tokenizer: Any) -> tuple[int, ...]:
    """The original's cut tokens: the last id of "?" and of "\\n?", "?" after a word prefix
    and without one (1577 and 29973 for LLaMA's tokenizer, where the original asserts them;
    one id for tokenizers that split the prefix off)."""
    ids = tuple(dict.fromkeys(tokenizer.encode(text)[-1] for text in ("?", "\n?")))
    for i in ids:
        if tokenizer.decode([i]).strip() != "?":
            raise ValueError(f"ppo.cut_at_question_mark: token {i} of this tokenizer is "
                             f"{tokenizer.decode([i])!r}, not '?'")
    return ids


def load_roles(cfg: Any) -> tuple[roles.PPOSpec, dict, dict]:
    """(spec, trainable params, frozen trees): the four roles over one or two bases."""
    from llava_jax.model_ckpt import load_adapter_dir, load_checkpoint
    from llava_jax.trainer import load_model, runtime_knobs

    runtime = runtime_knobs(cfg)
    policy_config, policy_base, _ = load_model(cfg)
    shared = not cfg.ppo.reward_base or os.path.abspath(cfg.ppo.reward_base) == os.path.abspath(cfg.model.init)
    if shared:
        reward_config, rbase = policy_config, policy_base
    else:
        reward_config, rbase = load_checkpoint(cfg.ppo.reward_base, dtype=cfg.model.param_dtype)
        reward_config = reward_config.with_runtime(**runtime)
    if cfg.ppo.policy_adapter:
        policy, _, _ = load_adapter_dir(cfg.ppo.policy_adapter, policy_base)
    else:  # b = 0: the policy starts as (and the reference stays) the base model
        targets = tuple(t.strip() for t in cfg.train.lora_targets.split(",") if t.strip())
        lcfg = lora_lib.LoraConfig(rank=cfg.train.lora_rank, alpha=cfg.train.lora_alpha, targets=targets)
        policy = lora_lib.init_adapter(policy_base, lcfg, jax.random.PRNGKey(cfg.seed))
    reward, reward_head, kind = load_adapter_dir(cfg.ppo.reward_adapter, rbase)
    if kind != "reward":
        raise ValueError(f"config.ppo.reward_adapter={cfg.ppo.reward_adapter!r} has no reward head (head: {kind})")
    spec = roles.PPOSpec(policy_config, policy.config, reward_config, reward.config, reward.config, shared,
                         temperature=cfg.ppo.temperature)
    f32 = functools.partial(trainable.cast_tree, dtype=jnp.float32)
    params = {"policy": f32(policy.params), "value": f32(reward.params),
              "value_head": heads.init_head("value", reward_config.text.hidden_size)}
    frozen = {"policy_base": policy_base, "ref": policy.params, "reward": reward.params, "reward_head": reward_head}
    if not shared:
        frozen["reward_base"] = rbase
    return spec, params, frozen


def roles_logical(spec: roles.PPOSpec, tree: dict) -> dict:
    """Logical PartitionSpecs of the trainable params or the frozen trees."""
    from llava_jax.models.llava import logical_axes

    policy_axes, reward_axes = logical_axes(spec.policy_config), logical_axes(spec.reward_config)
    adapter_axes = {"policy": policy_axes, "ref": policy_axes, "value": reward_axes, "reward": reward_axes}
    out = {}
    for key, value in tree.items():
        if key in adapter_axes:
            out[key] = sharding.adapter_logical_axes(value, adapter_axes[key])
        elif key.endswith("head"):
            out[key] = jax.tree_util.tree_map(lambda _: PartitionSpec(), value)
    return out


def place_frozen(spec: roles.PPOSpec, frozen: dict, mesh: Any) -> tuple[dict, dict]:
    shardings = sharding.shardings_for({k: v for k, v in frozen.items() if not k.endswith("base")},
                                       roles_logical(spec, frozen), mesh)
    shardings["policy_base"] = frozen_shardings(spec.policy_config, frozen["policy_base"], mesh)
    if "reward_base" in frozen:
        shardings["reward_base"] = frozen_shardings(spec.reward_config, frozen["reward_base"], mesh)
    return jax.device_put(frozen, shardings), shardings


def build_prompts(cfg: Any, spec: roles.PPOSpec) -> tuple[Any, Any, Any]:
    """(prompt loader, tokenizer, reward prompt); each process reads its shard."""
    from llava_jax.data import ImageProcessor, Loader, RLPromptDataset, load_captions, load_tokenizer, vision_kwargs
    from llava_jax.reward_prompt import DEFAULT_PROMPT_FILE, RewardPrompt

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    reward_images = None
    if not spec.shared_base:
        reward_images = ImageProcessor.for_image_size(spec.reward_config.vision.image_size)
    dataset = RLPromptDataset(cfg.data.train, tokenizer, captions=load_captions(cfg.data.captions) if cfg.data.captions
                              else None, max_query_tokens=cfg.ppo.max_query_tokens,
                              reward_image_processor=reward_images, image_folder=cfg.data.image_folder,
                              template=cfg.data.template, strict=cfg.data.strict, **vision_kwargs(spec.policy_config))
    chunk = (cfg.ppo.rollout_chunk or cfg.ppo.rollout_batch) // jax.process_count()
    loader = Loader(dataset, chunk, seed=cfg.seed, buckets=[dataset.max_length], pad_side="left",
                    num_workers=cfg.data.workers)
    prompt = RewardPrompt.from_file(cfg.rm.prompt_file or DEFAULT_PROMPT_FILE)
    return loader, tokenizer, prompt


def minibatch_order(seed: int, step: int, epoch: int, rows: int) -> np.ndarray:
    return np.random.default_rng((seed, step, epoch)).permutation(rows)


def run_ppo(cfg: Any) -> dict:
    """Trains the policy (and value) with PPO as configured; returns the last metrics."""
    from llava_jax.data import load_captions
    from llava_jax.metrics import MetricsWriter, ProgressBar
    from llava_jax.trainer import validate

    validate(cfg)
    validate_ppo(cfg)
    p = cfg.ppo
    mesh = sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    spec, params, frozen = load_roles(cfg)
    loader, tokenizer, prompt = build_prompts(cfg, spec)
    chunks_per_step = p.rollout_batch // (p.rollout_chunk or p.rollout_batch)
    prompts = len(loader.dataset.items)
    # The original's count: prompts x epochs // rollout_batch (a partial last rollout batch is not run).
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, int(cfg.train.num_epochs * prompts)
                                                                     // p.rollout_batch)
    updates_per_step = p.ppo_epochs * (p.rollout_batch // p.step_batch)
    optimizer, schedule = ppo_optimizer(cfg, steps)
    hyper = ppo_hyper(cfg)
    sampling = SamplingConfig(max_new_tokens=p.response_len, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, cache_dtype=p.cache_dtype)
    weights = fact_reward.RewardWeights(p.rm_weight, p.correct_bonus, p.length_bonus, p.no_stop_penalty)
    rcfg = RolloutConfig(sampling, weights, with_facts=p.with_facts, template=cfg.data.template,
                         pad_multiple=p.reward_pad_multiple, seed=cfg.seed,
                         cut_ids=question_mark_ids(tokenizer) if p.cut_at_question_mark else (),
                         recompute_logprobs=p.old_logprobs == "recompute")

    frozen, frozen_sh = place_frozen(spec, frozen, mesh)
    rng = jax.random.PRNGKey(cfg.seed)
    state_shape = jax.eval_shape(lambda q: create_state(q, optimizer, rng), params)
    state_sh = state_shardings(spec.policy_config, state_shape, mesh, logical=roles_logical(spec, params))
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step() if cfg.resume else None
    kl_coef = float(p.kl_coef)
    if latest is not None:
        abstract = {"train": jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                                    state_shape, state_sh),
                    "kl_coef": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))}
        restored, loader_states = ckpt.restore(latest, abstract)
        state, kl_coef = restored["train"], float(restored["kl_coef"])
        loader.restore(loader_states[jax.process_index()])
    else:
        # host copies: restored arrays are committed to one device, the state spans the mesh
        state = jax.jit(lambda q: create_state(q, optimizer, rng), out_shardings=state_sh)(jax.device_get(params))
    del params
    rollouts = Rollouts(spec, hyper, rcfg, tokenizer, prompt, mesh, frozen_sh)
    step_fn = jax.jit(functools.partial(ppo.ppo_step, spec, hyper, optimizer, schedule),
                      in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
    take = jax.jit(lambda tree, idx: jax.tree_util.tree_map(lambda x: x[idx], tree))

    judge_captions = (load_captions(os.path.join(cfg.eval.toy_dir, "captions.json")) if cfg.eval.toy_dir
                      else None)
    writer = MetricsWriter(cfg.workdir, process_index=jax.process_index(), tensorboard=cfg.log.tensorboard,
                           resume_step=latest)
    start = int(jax.device_get(state.step)) // updates_per_step
    bar = ProgressBar(steps, initial=start, process_index=jax.process_index(), desc="ppo")
    last: dict = {}
    with jax.set_mesh(mesh), sharding.activation_rules():  # set_mesh: flax sees the mesh (activation constraints)
        for step in range(start + 1, steps + 1):
            timings = {"generate": 0.0, "score": 0.0}
            batches = [next(loader) for _ in range(chunks_per_step)]
            rollout, metrics, samples = rollouts.collect(frozen, state.params, batches, step, kl_coef, timings)
            if judge_captions is not None:
                metrics["hallucination_rate"] = rollout_hallucination(samples, judge_captions)
            begin = time.perf_counter()
            sums: dict[str, float] = {}
            for epoch in range(p.ppo_epochs):
                order = minibatch_order(cfg.seed, step, epoch, p.rollout_batch)
                for start_row in range(0, p.rollout_batch, p.step_batch):
                    minibatch = take(rollout, jnp.asarray(order[start_row:start_row + p.step_batch]))
                    state, update = step_fn(state, frozen, minibatch)
                    for key, value in jax.device_get(update).items():
                        sums[key] = sums.get(key, 0.0) + float(value)
            update_seconds = time.perf_counter() - begin
            metrics.update({k: v / updates_per_step for k, v in sums.items()})
            seconds = timings["generate"] + timings["score"] + update_seconds
            metrics.update(rollout_seconds=timings["generate"], score_seconds=timings["score"],
                           update_seconds=update_seconds, step_seconds=seconds,
                           tokens_per_s=metrics["response_length"] * p.rollout_batch / seconds)
            if p.adaptive_kl:
                kl_coef = ppo.adaptive_kl_coef(kl_coef, metrics["kl"], p.target_kl, p.kl_horizon, p.rollout_batch)
            if step % cfg.log.every == 0 or step == steps:
                writer.write(step, metrics)
                if jax.process_index() == 0:
                    write_samples(cfg.workdir, step, samples)
            bar.update(step, loss=metrics["score_total"], tokens_per_second=metrics["tokens_per_s"])
            last = {"step": step, **metrics}
            ckpt.save(step, {"train": state, "kl_coef": jnp.float32(kl_coef)}, gather_loader_states(loader.state()),
                      force=step == steps or ckpt.preempted)
            if ckpt.preempted:
                print(f"SIGTERM: saved step {step}, exiting")
                break
    ckpt.close()
    writer.close()
    bar.close()
    loader.close()
    # Export whenever the final state is at hand: also on a rerun that found the last step
    # already checkpointed (a kill before the export, or a multi-host run exported from one host).
    if not ckpt.preempted and (last.get("step") == steps or start >= steps):
        export_policy(cfg, spec, state, frozen)
        if cfg.eval.toy_dir and jax.process_index() == 0:
            evaluate_toy(cfg, spec, state, frozen, tokenizer)
    return last


def rollout_hallucination(samples: list[dict], captions: dict) -> float:
    """Share of the rollout's description answers (caption_type 1) that name a shape the
    image lacks, by the toy judge (this process's rows)."""
    from llava_jax.data.toy_judge import hallucination_rate

    rows = [s for s in samples if s["caption_type"] == 1 and s["image"] in captions]
    return hallucination_rate([s["response"] for s in rows], [captions[s["image"]] for s in rows])


def evaluate_toy(cfg: Any, spec: roles.PPOSpec, state: Any, frozen: dict, tokenizer: Any) -> dict:
    """Greedy held-out evaluation of the starting (SFT) policy and the PPO policy on the toy
    world: prints the before/after table, writes workdir/eval/."""
    from llava_jax.toy_eval import compare, format_table

    base = jax.device_get(frozen["policy_base"])
    policies = [("sft", lora_lib.Adapter(jax.device_get(frozen["ref"]), spec.policy_lora)),
                ("ppo", lora_lib.Adapter(jax.device_get(state.params["policy"]), spec.policy_lora))]
    out = os.path.join(cfg.workdir, "eval")
    summary = compare([(name, spec.policy_config, base, adapter) for name, adapter in policies], tokenizer,
                      cfg.eval.toy_dir, out, cfg.ppo.response_len, cfg.eval.batch_size)
    print(f"held-out evaluation on {cfg.eval.toy_dir} (answers and summary.json in {out}):")
    print(format_table(summary))
    return summary


def export_policy(cfg: Any, spec: roles.PPOSpec, state: Any, frozen: dict) -> None:
    """workdir/adapter (ours), workdir/peft_adapter (PEFT), workdir/value_adapter (value
    LoRA + head), optionally workdir/hf_merged, and workdir/metrics.png with the reward curve."""
    from llava_jax.model_ckpt import write_adapter_dir
    from llava_jax.convert.peft import write_peft_adapter
    from llava_jax.metrics import plot_run

    if jax.process_count() > 1:
        print("export of the trained policy is single-process only: rerun this command as one process (one "
              "host) and it restores the final checkpoint and exports")
        return
    params = jax.device_get(state.params)
    policy = lora_lib.Adapter(params["policy"], spec.policy_lora)
    write_adapter_dir(os.path.join(cfg.workdir, "adapter"), policy, overwrite=True, extra={"trained_by": "ppo"})
    write_adapter_dir(os.path.join(cfg.workdir, "value_adapter"), lora_lib.Adapter(params["value"], spec.value_lora),
                      params["value_head"], "value", overwrite=True, extra={"trained_by": "ppo"})
    write_peft_adapter(os.path.join(cfg.workdir, "peft_adapter"), policy, overwrite=True,
                       base_model_name_or_path=os.path.abspath(cfg.model.init) if cfg.model.init != "tiny" else None)
    if cfg.ppo.export_merged:
        from llava_jax.convert import export_hf

        base = jax.device_get(frozen["policy_base"])
        export_hf(spec.policy_config, lora_lib.merge(base, policy), os.path.join(cfg.workdir, "hf_merged"),
                  tokenizer_dir=cfg.data.tokenizer, overwrite=True)
    if jax.process_index() == 0:
        out = plot_run(cfg.workdir, ["score_total", "rm_score", "hallucination_rate", "response_length", "kl",
                                     "policy_loss", "value_loss"])
        print(f"policy adapter: {cfg.workdir}/adapter (PEFT: {cfg.workdir}/peft_adapter); curves: {out}")
