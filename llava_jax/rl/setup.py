"""The PPO layout, shared by the PPO loop (rl/loop.py) and the compile check: the four
roles' trees over one or two bases (`roles_trees`), their shardings, the PPO
hyper-parameters, optimiser, sampling settings, the jitted update and the passes of
minibatch updates over one rollout (`minibatch_updates`, run by the loop and the benchmarks).

Trainable: {policy LoRA, value LoRA, value head} (float32). Frozen: the policy base, the
reference adapter (the policy's start), the reward LoRA + head, and with ppo.reward_base a
second base under the reward and value models.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llava_jax import sharding
from llava_jax.models import heads, lora as lora_lib
from llava_jax.rl import ppo, roles
from llava_jax.train import setup as run_setup
from llava_jax.models import trainable
from llava_jax.models.llava import logical_axes
from llava_jax.train.optim import make_optimizer
from llava_jax.generate.sampling import SamplingConfig
from llava_jax.settings import PPOSettings, RunSettings


def ppo_hyper(p: PPOSettings) -> ppo.PPOHyper:
    """The PPO update's hyper-parameters, built here only: each PPOHyper field is the `ppo`
    setting of its name (PPOHyper has no defaults); `exact_ratio` follows `ppo.old_logprobs`."""
    return ppo.PPOHyper(clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef, gamma=p.gamma, lam=p.lam,
                        kl_estimator=p.kl_estimator, reward_scale=p.reward_scale, whiten_rewards=p.whiten_rewards,
                        whiten_over_pads=p.whiten_over_pads, loss_over_pads=p.loss_over_pads, grad_accum=p.grad_accum,
                        exact_ratio=p.recompute_old_logprobs)


def ppo_optimizer(s: RunSettings, steps: int) -> tuple[Any, Any]:
    """(optimiser, schedule) of a PPO run of `steps` PPO steps; the schedule advances per
    optimiser update or, as the original, per PPO step (`ppo.lr_schedule_unit`)."""
    per_step = s.ppo.updates_per_step
    if s.ppo.lr_schedule_unit == "rollout":
        return make_optimizer(s.optim, steps, updates_per_unit=per_step)
    return make_optimizer(s.optim, steps * per_step)


def sampling_config(p: PPOSettings, eos_id: int, pad_id: int = 0) -> SamplingConfig:
    """The rollout sampler's settings, built here only (SamplingConfig holds no defaults for them)."""
    return SamplingConfig(max_new_tokens=p.response_len, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                          cache_dtype=p.cache_dtype, eos_id=eos_id, pad_id=pad_id)


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


def roles_trees(policy_base: dict, policy: lora_lib.Adapter, reward: lora_lib.Adapter, reward_head: dict,
                value_head: dict, reward_base: dict | None = None) -> tuple[dict, dict]:
    """(trainable params, frozen trees) of the four roles; traceable (the compile check runs
    it under eval_shape). The value model starts from the reward model's adapter."""
    f32 = functools.partial(trainable.cast_tree, dtype=jnp.float32)
    params = {"policy": f32(policy.params), "value": f32(reward.params), "value_head": value_head}
    frozen = {"policy_base": policy_base, "ref": policy.params, "reward": reward.params, "reward_head": reward_head}
    if reward_base is not None:
        frozen["reward_base"] = reward_base
    return params, frozen


def load_roles(s: RunSettings, mesh: Any) -> tuple[roles.PPOSpec, dict, dict]:
    """(spec, trainable params, frozen trees) from the run's checkpoints and adapters, each
    restored (or, for a fresh policy adapter and the value head, made) in its shards over `mesh`."""
    from llava_jax.models.weights import load_adapter_dir, load_checkpoint

    policy_config, policy_base, _ = run_setup.load_model(s, mesh)
    p = s.ppo
    shared = not p.reward_base or os.path.abspath(p.reward_base) == os.path.abspath(s.model.init)
    reward_config, rbase = policy_config, policy_base
    if not shared:
        reward_config, rbase = load_checkpoint(p.reward_base, dtype=s.model.param_dtype, mesh=mesh)
        reward_config = reward_config.with_runtime(**s.model.runtime_knobs())
    if p.policy_adapter:
        policy, _, _ = load_adapter_dir(p.policy_adapter, policy_base, mesh=mesh, config=policy_config)
    else:  # b = 0: the policy starts as (and the reference stays) the base model
        policy = run_setup.made_in_shards(
            lambda: lora_lib.init_adapter(policy_base, s.train.lora_config(), jax.random.PRNGKey(s.seed)),
            lambda a: sharding.shardings_for(a, lora_lib.Adapter(
                sharding.adapter_logical_axes(a.params, logical_axes(policy_config)), a.config), mesh))
    reward, reward_head, kind = load_adapter_dir(p.reward_adapter, rbase, mesh=mesh, config=reward_config)
    if kind != "reward":
        raise ValueError(f"config.ppo.reward_adapter={p.reward_adapter!r} has no reward head (head: {kind})")
    spec = roles.PPOSpec(policy_config, policy.config, reward_config, reward.config, reward.config, shared,
                         temperature=p.temperature)
    value_head = run_setup.made_in_shards(lambda: heads.init_head("value", reward_config.text.hidden_size),
                                          lambda h: jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), h))
    params, frozen = roles_trees(policy_base, policy, reward, reward_head, value_head, None if shared else rbase)
    return spec, params, frozen


def roles_logical(spec: roles.PPOSpec, tree: dict) -> dict:
    """Logical PartitionSpecs of the trainable params or of the frozen adapters and heads."""
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


def frozen_shardings(spec: roles.PPOSpec, frozen: dict, mesh: Any) -> dict:
    shardings = sharding.shardings_for({k: v for k, v in frozen.items() if not k.endswith("base")},
                                       roles_logical(spec, frozen), mesh)
    shardings["policy_base"] = run_setup.frozen_shardings(spec.policy_config, frozen["policy_base"], mesh)
    if "reward_base" in frozen:
        shardings["reward_base"] = run_setup.frozen_shardings(spec.reward_config, frozen["reward_base"], mesh)
    return shardings


def state_shardings(spec: roles.PPOSpec, state_shape: Any, mesh: Any) -> Any:
    return run_setup.state_shardings(state_shape, mesh, roles_logical(spec, state_shape.params))


def jit_ppo_step(spec: roles.PPOSpec, hyper: ppo.PPOHyper, optimizer: Any, schedule: Any, state_sh: Any,
                 frozen_sh: Any) -> Callable:
    """One PPO minibatch update `(state, frozen, batch, params_unchanged)`, jitted with explicit
    shardings; the state is donated."""
    return jax.jit(functools.partial(ppo.ppo_step, spec, hyper, optimizer, schedule),
                   in_shardings=(state_sh, frozen_sh, None, None), out_shardings=(state_sh, None),
                   donate_argnums=(0,))


# Jitted once per process: row selection of a rollout.
_take_rows = jax.jit(lambda tree, rows: jax.tree_util.tree_map(lambda x: x[rows], tree))


def update_learning_rates(schedule: Any, first_update: int, count: int) -> list[float]:
    """The learning rates of optimiser updates first_update .. first_update + count - 1."""
    return [float(v) for v in np.asarray(jax.vmap(schedule)(jnp.arange(first_update, first_update + count)))]


def minibatch_updates(step_fn: Callable, state: Any, frozen: dict, rollout: dict, orders: Sequence[np.ndarray],
                      step_batch: int, learning_rates: Sequence[float]) -> tuple[Any, list[dict]]:
    """The PPO epochs of one rollout: for each order (a permutation of the rollout's rows,
    one per epoch), an update `step_fn(state, frozen, minibatch, params_unchanged)` per
    `step_batch` rows. `learning_rates`: each update's, in order (update_learning_rates):
    while every earlier update ran at 0 the params are still the rollout's, and the update is
    told so (ppo.ppo_loss_sums). Returns the new state and each update's metrics, on the device."""
    metrics, unchanged = [], True
    for order in orders:
        for start in range(0, len(order), step_batch):
            state, m = step_fn(state, frozen, take_rows(rollout, order[start:start + step_batch]), unchanged)
            unchanged = unchanged and learning_rates[len(metrics)] == 0.0
            metrics.append(m)
    return state, metrics


def take_rows(tree: dict, rows: np.ndarray) -> dict:
    """Rows `rows` of every array in `tree` (a minibatch of a rollout)."""
    return _take_rows(tree, jnp.asarray(rows))
