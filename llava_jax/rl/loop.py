"""The PPO loop (`run_ppo`): per PPO step one rollout batch (rollout.py) and `ppo_epochs`
passes of shuffled minibatch updates (ppo.ppo_step), with checkpoints, metrics and the
exported policy at the end. The PPO layout is in rl/setup.py, what it shares with the
SFT/RM loop in train/setup.py.

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

from llava_jax import sharding
from llava_jax.rl import fact_reward, ppo, setup as ppo_setup, roles
from llava_jax.models import lora as lora_lib
from llava_jax.train import setup as run_setup
from llava_jax.rl.rollout import Rollouts, RolloutConfig, write_samples
from llava_jax.settings import RunSettings, validate


def build_prompts(s: RunSettings, spec: roles.PPOSpec) -> tuple[Any, Any, Any]:
    """(prompt loader, tokenizer, reward prompt); each process reads its shard."""
    from llava_jax.data import ImageProcessor, Loader, RLPromptDataset, load_captions, load_tokenizer, vision_kwargs
    from llava_jax.data.reward_prompt import DEFAULT_PROMPT_FILE, RewardPrompt

    tokenizer = load_tokenizer(s.data.tokenizer)
    reward_images = None
    if not spec.shared_base:
        reward_images = ImageProcessor.for_image_size(spec.reward_config.vision.image_size)
    dataset = RLPromptDataset(s.data.train, tokenizer, captions=load_captions(s.data.captions) if s.data.captions
                              else None, max_query_tokens=s.ppo.max_query_tokens,
                              reward_image_processor=reward_images, image_folder=s.data.image_folder,
                              template=s.data.template, strict=s.data.strict, **vision_kwargs(spec.policy_config))
    chunk = s.ppo.chunk // jax.process_count()
    loader = Loader(dataset, chunk, seed=s.seed, buckets=[dataset.max_length], pad_side="left",
                    num_workers=s.data.workers)
    prompt = RewardPrompt.from_file(s.rm.prompt_file or DEFAULT_PROMPT_FILE)
    return loader, tokenizer, prompt


def minibatch_order(seed: int, step: int, epoch: int, rows: int) -> np.ndarray:
    return np.random.default_rng((seed, step, epoch)).permutation(rows)


def run_ppo(s: RunSettings) -> dict:
    """Trains the policy (and value) with PPO as configured; returns the last metrics."""
    from llava_jax.data import load_captions

    validate(s, jax.process_count(), jax.device_count())
    p = s.ppo
    mesh = run_setup.make_mesh(s)
    spec, params, frozen = ppo_setup.load_roles(s, mesh)
    loader, tokenizer, prompt = build_prompts(s, spec)
    chunks_per_step = p.rollout_batch // p.chunk
    # The original's count: prompts x epochs // rollout_batch (a partial last rollout batch is not run).
    prompts = len(loader.dataset)
    steps = s.train.max_steps if s.train.max_steps > 0 else max(1, int(s.train.num_epochs * prompts) // p.rollout_batch)
    optimizer, schedule = ppo_setup.ppo_optimizer(s, steps)
    hyper = ppo_setup.ppo_hyper(p)
    weights = fact_reward.RewardWeights.from_settings(p)
    rcfg = RolloutConfig(sampling=ppo_setup.sampling_config(p, tokenizer.eos_id, tokenizer.pad_id), weights=weights,
                         with_facts=p.with_facts, template=s.data.template, pad_multiple=p.reward_pad_multiple,
                         seed=s.seed, cut_ids=ppo_setup.question_mark_ids(tokenizer) if p.cut_at_question_mark else (),
                         recompute_logprobs=p.recompute_old_logprobs)
    frozen_sh = ppo_setup.frozen_shardings(spec, frozen, mesh)
    frozen = run_setup.place(frozen, frozen_sh)
    state_shape = run_setup.abstract_state(s, params, optimizer)
    state_sh = ppo_setup.state_shardings(spec, state_shape, mesh)
    ckpt = run_setup.open_checkpoints(s)
    state, extras, loader_state, latest = run_setup.init_or_restore(s, ckpt, lambda t: t, (params,), optimizer,
                                                                    state_shape, state_sh, {"kl_coef": float(p.kl_coef)})
    if loader_state is not None:
        loader.restore(loader_state)
    kl_coef = extras["kl_coef"]
    del params
    rollouts = Rollouts(spec, hyper, rcfg, tokenizer, prompt, mesh, frozen_sh)
    step_fn = ppo_setup.jit_ppo_step(spec, hyper, optimizer, schedule, state_sh, frozen_sh)
    add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))
    judge_captions = load_captions(os.path.join(s.eval.toy_dir, "captions.json")) if s.eval.toy_dir else None

    def derive(m: dict) -> dict:  # the update's mean metrics and the step's throughput, on the host
        out = {k: v for k, v in m.items() if not k.startswith("sum_")}
        out.update({k[len("sum_"):]: v / p.updates_per_step for k, v in m.items() if k.startswith("sum_")})
        out["update_seconds"] = m["step_seconds"] - m["rollout_seconds"] - m["score_seconds"]
        out["tokens_per_s"] = m["response_length"] * p.rollout_batch / m["step_seconds"]
        return out

    lrs = ppo_setup.update_learning_rates(schedule, 0, steps * p.updates_per_step)  # once: the host's copy
    start = latest or 0
    tail = run_setup.StepTail(s, ckpt, steps=steps, start=start, desc="ppo", bar_loss="score_total", derive=derive)
    with jax.set_mesh(mesh), sharding.activation_rules():  # set_mesh: flax sees the mesh (activation constraints)
        for step in range(start + 1, steps + 1):
            begin = time.perf_counter()
            timings = {"generate": 0.0, "score": 0.0}
            batches = [next(loader) for _ in range(chunks_per_step)]
            rollout, metrics, samples = rollouts.collect(frozen, state.params, batches, step, kl_coef, timings)
            if judge_captions is not None:
                metrics["hallucination_rate"] = rollout_hallucination(samples, judge_captions)
            orders = [minibatch_order(s.seed, step, epoch, p.rollout_batch) for epoch in range(p.ppo_epochs)]
            first = (step - 1) * p.updates_per_step
            state, updates = ppo_setup.minibatch_updates(step_fn, state, frozen, rollout, orders, p.step_batch,
                                                         lrs[first:first + p.updates_per_step])
            sums = functools.reduce(add, updates)  # stays on the device
            if p.adaptive_kl:
                kl_coef = ppo.adaptive_kl_coef(kl_coef, metrics["kl"], p.target_kl, p.kl_horizon, p.rollout_batch)
            if (step % s.log.every == 0 or step == steps) and jax.process_index() == 0:
                write_samples(s.workdir, step, samples)
            jax.block_until_ready(state)  # the step's wall time includes its updates
            metrics.update(rollout_seconds=timings["generate"], score_seconds=timings["score"],
                           step_seconds=time.perf_counter() - begin)
            on_device = {f"sum_{k}": v for k, v in sums.items()}
            if tail.end_step(step, on_device, metrics, {"train": state, "extras": {"kl_coef": jnp.float32(kl_coef)}},
                             loader):
                break
    last = tail.close()
    loader.close()
    # Export whenever the final state is at hand: also on a rerun that found the last step
    # already checkpointed (a kill before the export, or a multi-host run exported from one host).
    if not tail.preempted:
        export_policy(s, spec, state, frozen)
        if s.eval.toy_dir and jax.process_count() == 1:  # multi-host: the one-process rerun that exports evaluates
            evaluate_toy(s, spec, state, frozen, tokenizer)
    return last


def rollout_hallucination(samples: list[dict], captions: dict) -> float:
    """Share of the rollout's description answers (caption_type 1) that name a shape the
    image lacks, by the toy judge, over every process's rows."""
    from llava_jax.eval.toy_judge import hallucinates, scene_objects

    rows = [s for s in samples if s["caption_type"] == 1 and s["image"] in captions]
    counts = np.asarray([sum(hallucinates(s["response"], scene_objects(captions[s["image"]])) for s in rows),
                         len(rows)], np.int64)
    counts = sharding.gather_processes(counts).sum(0)
    return float(counts[0]) / max(int(counts[1]), 1)


def evaluate_toy(s: RunSettings, spec: roles.PPOSpec, state: Any, frozen: dict, tokenizer: Any) -> dict:
    """Greedy held-out evaluation of the starting (SFT) policy and the PPO policy on the toy
    world: prints the before/after table, writes workdir/eval/."""
    from llava_jax.eval.toy_eval import compare, format_table

    mesh = jax.tree_util.tree_leaves(frozen["policy_base"])[0].sharding.mesh
    policies = [("sft", lora_lib.Adapter(frozen["ref"], spec.policy_lora)),
                ("ppo", lora_lib.Adapter(state.params["policy"], spec.policy_lora))]
    out = os.path.join(s.workdir, "eval")
    summary = compare([(name, spec.policy_config, frozen["policy_base"], adapter) for name, adapter in policies],
                      tokenizer, s.eval.toy_dir, out, s.ppo.response_len, s.eval.batch_size, mesh=mesh)
    print(f"held-out evaluation on {s.eval.toy_dir} (answers and summary.json in {out}):")
    print(format_table(summary))
    return summary


def export_policy(s: RunSettings, spec: roles.PPOSpec, state: Any, frozen: dict) -> None:
    """workdir/adapter (ours), workdir/peft_adapter (PEFT), workdir/value_adapter (value
    LoRA + head), optionally workdir/hf_merged, and workdir/metrics.png with the reward curve."""
    from llava_jax.models.weights import write_adapter_dir
    from llava_jax.convert.peft import write_peft_adapter
    from llava_jax.train.metrics import plot_run

    if jax.process_count() > 1:
        print("export of the trained policy is single-process only: rerun this command as one process (one "
              "host) and it restores the final checkpoint and exports")
        return
    params = jax.device_get(state.params)
    policy = lora_lib.Adapter(params["policy"], spec.policy_lora)
    write_adapter_dir(os.path.join(s.workdir, "adapter"), policy, overwrite=True, extra={"trained_by": "ppo"})
    write_adapter_dir(os.path.join(s.workdir, "value_adapter"), lora_lib.Adapter(params["value"], spec.value_lora),
                      params["value_head"], "value", overwrite=True, extra={"trained_by": "ppo"})
    write_peft_adapter(os.path.join(s.workdir, "peft_adapter"), policy, overwrite=True,
                       base_model_name_or_path=os.path.abspath(s.model.init) if s.model.init != "tiny" else None)
    if s.ppo.export_merged:
        from llava_jax.convert import export_hf

        # merged on the devices, shard by shard; export_hf then brings it to the host leaf by leaf
        merged = lora_lib.merge_in_shards(frozen["policy_base"], lora_lib.Adapter(state.params["policy"],
                                                                                   spec.policy_lora))
        export_hf(spec.policy_config, merged, os.path.join(s.workdir, "hf_merged"),
                  tokenizer_dir=s.data.tokenizer, overwrite=True)
        del merged
    if jax.process_index() == 0:
        out = plot_run(s.workdir, ["score_total", "rm_score", "hallucination_rate", "response_length", "kl",
                                     "policy_loss", "value_loss"])
        print(f"policy adapter: {s.workdir}/adapter (PEFT: {s.workdir}/peft_adapter); curves: {out}")
