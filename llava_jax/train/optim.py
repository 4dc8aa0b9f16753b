"""Optimiser and learning-rate schedules from the run's `optim` settings (AdamW, warmup +
cosine / constant / linear, global-norm clipping), as LLaVA-RLHF's stages use them. The
fields, their defaults and docs are the settings tree's (`llava_jax.settings.OptimSettings`;
`OptimConfig` is that section, kept under its old name)."""
from __future__ import annotations

import math
from typing import get_args

import optax

from llava_jax.settings import OptimSettings, Schedule

OptimConfig = OptimSettings
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(math.ceil(cfg.warmup_ratio * total_steps))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then the named shape (HF's cosine / constant-with-warmup)."""
    warm = warmup_steps(cfg, total_steps)
    decay = max(total_steps - warm, 1)
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(warm, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay)
    if warm == 0:
        return after
    return optax.join_schedules([warmup, after], [warm])


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   updates_per_unit: int = 1) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) whose schedule has `total_steps` units of `updates_per_unit`
    optimiser updates each: PPO's schedule unit is an update or, as the original steps its
    scheduler once per rollout batch, a whole PPO step (warmup then counts rollouts, and
    every update of the first rollout runs at lr 0)."""
    schedule = make_schedule(cfg, total_steps)
    if updates_per_unit > 1:
        per_update = schedule
        schedule = lambda count: per_update(count // updates_per_unit)  # noqa: E731
    chain = []
    if cfg.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*chain), schedule
