"""PPO math and the update step (LLaVA-RLHF / AlpacaFarm PPO), all pure functions.

Per response token t (valid where `mask`): the KL estimate between policy and reference,
shaped rewards r_t = -kl_coef * kl_t plus the sequence score, scaled x`reward_scale` (or
whitened without a mean shift), GAE advantages and returns, advantages whitened over the
GLOBAL rollout batch (under jit on sharded arrays the sums below are all-reduced across
every device and host). The update minimises the clipped policy loss plus vf_coef x the
clipped value loss, means over the minibatch (micro-batches are summed first, so the
result does not depend on the split).

Where the pad positions of the [B, N] response tensor count is two choices (PPOHyper):
* `whiten_over_pads` (the original): the score sits on the tensor's last position, GAE runs
  through the pads (a pad's advantage is reward_scale x score - V(pad)), and the advantage
  whitening statistics span every position. Off: the episode ends at the last valid token
  and only valid tokens enter the statistics.
* `loss_over_pads` (the original): both losses are means over every position; at a pad the
  log-probs count as 0 (the original's ignore_index), so the policy term there carries no
  gradient but dilutes the mean, and the value loss fits V(pad) to the pad's return. Off:
  means over valid tokens.
Either field lays the episode over every position (the value loss over pads needs the pads'
returns). At gamma = lambda = 1 the valid tokens' raw advantages and returns agree in both
layouts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from llava_jax.rl import roles
from llava_jax.rl.batches import Rollout
from llava_jax.train.state import TrainState, accumulate, apply_gradients

KL_ESTIMATORS = ("k1", "k1_unclamped", "k3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOHyper:
    """The update's hyper-parameters: the run's `ppo` settings of the same names (their
    defaults, types and docs live in the settings tree, `llava_jax.settings.PPOSettings`, checked
    there), built in one place, `rl.setup.ppo_hyper`; no defaults of their own."""
    clip: float
    value_clip: float
    vf_coef: float
    gamma: float
    lam: float
    kl_estimator: str
    reward_scale: float
    whiten_rewards: bool
    whiten_over_pads: bool
    loss_over_pads: bool
    exact_ratio: bool = False  # old log-probs and values from the update's own forward while the
    # trained params are still the rollout's (see ppo_loss_sums)
    grad_accum: int


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over the valid entries."""
    return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / (std + 1e-8) over the valid entries, population std as the original's
    (mean added back when not shifting); invalid entries become 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) / (jnp.sqrt(masked_var(x, mask)) + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token KL(policy || ref) estimate from the sampled token's log-probs.

    k1: log p - log q clamped at 0 (LLaVA-RLHF); k1_unclamped: log p - log q;
    k3: (r - 1) - log r with r = q / p (non-negative, low variance)."""
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return jnp.maximum(diff, 0.0)
    if estimator == "k1_unclamped":
        return diff
    if estimator == "k3":
        return jnp.expm1(-diff) + diff
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_valid_onehot(mask: jax.Array) -> jax.Array:
    """One-hot [B, N] of each row's last valid token (responses are right padded)."""
    last = jnp.sum(mask, axis=-1) - 1
    return (jnp.arange(mask.shape[-1])[None] == last[:, None]) & mask


def shape_rewards(kl: jax.Array, score: jax.Array, mask: jax.Array, kl_coef: jax.Array | float) -> jax.Array:
    """-kl_coef x kl on every valid token, plus the sequence score on the last one."""
    penalty = jnp.where(mask, -kl_coef * kl, 0.0)
    return penalty + jnp.where(last_valid_onehot(mask), score[:, None], 0.0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, N] by generalised advantage estimation; the episode ends
    after the last valid token (the value after it is 0)."""
    maskf = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:] * maskf[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_valid = jnp.concatenate([maskf[:, 1:], jnp.zeros_like(maskf[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, xs):
        delta, cont = xs
        adv = delta + gamma * lam * cont * carry
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, next_valid.T), reverse=True)
    advantages = adv.T * maskf
    return advantages, (advantages + values) * maskf


def compute_advantages(hyper: PPOHyper, rollout: Rollout, kl_coef: jax.Array) -> tuple[Rollout, dict]:
    """The scored rollout batch (the GLOBAL batch: the whitening statistics span every device
    and host) with its rewards, advantages and returns, plus the rollout metrics."""
    mask = rollout.response_mask.astype(bool)
    kl = jnp.where(mask, kl_estimate(rollout.logprobs, rollout.ref_logprobs, hyper.kl_estimator), 0.0)
    pads_are_steps = hyper.whiten_over_pads or hyper.loss_over_pads
    # The original adds the score at the tensor's last position and runs GAE over every one.
    steps = jnp.ones_like(mask) if pads_are_steps else mask
    shaped = shape_rewards(kl, rollout.score, steps, kl_coef)
    rewards = whiten(shaped, steps, shift_mean=False) if hyper.whiten_rewards else shaped * hyper.reward_scale
    advantages, returns = gae(rewards, rollout.values, steps, hyper.gamma, hyper.lam)
    rows = rollout.valid.astype(bool)
    row_mean = functools.partial(masked_mean, mask=rows)  # over the batch's real (not padding) rows
    explained = 1.0 - masked_var(returns - rollout.values, mask) / (masked_var(returns, mask) + 1e-8)
    metrics = {
        "kl": row_mean(jnp.sum(kl, axis=-1)),  # per sequence
        "kl_per_token": masked_mean(kl, mask),
        "kl_penalty": row_mean(-kl_coef * jnp.sum(kl, axis=-1)),
        "kl_coef": kl_coef,
        "score_total": row_mean(rollout.score),
        "shaped_reward_sum": row_mean(jnp.sum(shaped, axis=-1)),
        "return_mean": masked_mean(returns, mask),
        "value_mean": masked_mean(rollout.values, mask),
        "value_explained_variance": explained,
        "advantage_mean_raw": masked_mean(advantages, mask),
    }
    stats = jnp.ones_like(mask) if hyper.whiten_over_pads else mask
    out = rollout.replace(advantages=whiten(advantages, stats, shift_mean=True), returns=returns, rewards=rewards)
    return out, metrics


def policy_loss_terms(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                      clip: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (clipped policy loss, clipped?, approx-KL term 0.5 (log ratio)^2)."""
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    return jnp.maximum(loss1, loss2), (loss2 > loss1).astype(jnp.float32), 0.5 * jnp.square(log_ratio)


def value_loss_terms(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                     clip: float) -> tuple[jax.Array, jax.Array]:
    """Per-token (clipped value loss 0.5 max((v - R)^2, (v_clipped - R)^2), clipped?)."""
    clipped = jnp.clip(values, old_values - clip, old_values + clip)
    loss1 = jnp.square(values - returns)
    loss2 = jnp.square(clipped - returns)
    return 0.5 * jnp.maximum(loss1, loss2), (loss2 > loss1).astype(jnp.float32)


def objective_sums(hyper: PPOHyper, logp: jax.Array, entropy: jax.Array, values: jax.Array,
                   batch: Rollout) -> tuple[jax.Array, dict]:
    """Sum over the loss positions (valid tokens, or every position with `loss_over_pads`)
    of (policy loss + vf_coef x value loss), and metric sums; `logp`, `entropy`, `values` are
    the current policy's and value's [B, N]."""
    valid = batch.response_mask.astype(bool)
    old_logp = batch.logprobs
    if hyper.loss_over_pads:  # a pad's log-prob is 0 under both policies (the original's ignore_index)
        logp, old_logp = jnp.where(valid, logp, 0.0), jnp.where(valid, old_logp, 0.0)
    positions = jnp.ones_like(valid) if hyper.loss_over_pads else valid
    pg, pg_clipped, approx_kl = policy_loss_terms(logp, old_logp, batch.advantages, hyper.clip)
    vf, vf_clipped = value_loss_terms(values, batch.values, batch.returns, hyper.value_clip)
    pg_sum, vf_sum = masked_sum(pg, positions), masked_sum(vf, positions)
    aux = {"policy_loss": pg_sum, "value_loss": vf_sum, "policy_clipfrac": masked_sum(pg_clipped, positions),
           "value_clipfrac": masked_sum(vf_clipped, positions), "approx_kl": masked_sum(approx_kl, positions),
           "entropy": masked_sum(entropy, positions), "tokens": jnp.sum(positions).astype(jnp.float32)}
    return pg_sum + hyper.vf_coef * vf_sum, aux


def policy_value_outputs(spec: roles.PPOSpec, params: dict, frozen: dict, batch: Rollout
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The trained roles on rollouts: the policy's log-probs and entropies and the value's
    estimates [B, N]. The update's forward, and (ppo.old_logprobs = "recompute") the
    teacher-forced pass that gives a rollout its old log-probs and values."""
    logp, entropy = roles.response_logprobs(spec, frozen["policy_base"], params["policy"], batch,
                                            batch.policy_features)
    values = roles.response_values(spec, roles.reward_base(spec, frozen), params["value"], params["value_head"],
                                   batch, batch.value_features)
    return logp, entropy, values


def ppo_loss_sums(spec: roles.PPOSpec, hyper: PPOHyper, params: dict, frozen: dict, batch: Rollout,
                  params_unchanged: jax.Array | bool) -> tuple[jax.Array, dict]:
    """`objective_sums` of a minibatch under the current policy and value.

    `params_unchanged`: the trained params are still the ones the rollout was scored with (the
    loop knows: the first update of a PPO step, and every update after ones at learning rate
    0). Then, with `exact_ratio`, the old log-probs and values are this forward's own: they are
    what the rollout's teacher-forced pass computes, but under autodiff XLA may fuse a forward
    otherwise than alone (1-ulp differences on XLA:CPU in float32, more in bfloat16; other
    batch shapes may tile otherwise on GPUs), and this way the ratio is exactly 1 on any
    backend, at no cost. Otherwise the old values are the rollout's."""
    logp, entropy, values = policy_value_outputs(spec, params, frozen, batch)
    if hyper.exact_ratio:
        own = jnp.asarray(params_unchanged, bool)
        batch = batch.replace(logprobs=jnp.where(own, jax.lax.stop_gradient(logp), batch.logprobs),
                              values=jnp.where(own, jax.lax.stop_gradient(values), batch.values))
    return objective_sums(hyper, logp, entropy, values, batch)


def ppo_step(spec: roles.PPOSpec, hyper: PPOHyper, optimizer: optax.GradientTransformation,
             schedule: optax.Schedule, state: TrainState, frozen: dict, batch: Rollout,
             params_unchanged: jax.Array | bool) -> tuple[TrainState, dict]:
    """One optimiser step on a minibatch of rollouts (grad_accum micro-batches);
    `params_unchanged`: see ppo_loss_sums."""
    rng, step_rng = jax.random.split(state.rng)
    loss_fn = lambda p, mb, key: ppo_loss_sums(spec, hyper, p, frozen, mb, params_unchanged)  # noqa: E731
    grads, aux = accumulate(loss_fn, state.params, batch, hyper.grad_accum, step_rng)
    tokens = jnp.maximum(aux.pop("tokens"), 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / tokens, grads)
    new_state, grad_norm = apply_gradients(state, grads, optimizer, rng)
    metrics = {k: v / tokens for k, v in aux.items()}
    metrics["loss"] = metrics["policy_loss"] + hyper.vf_coef * metrics["value_loss"]
    return new_state, {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step)}


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_rollouts: int) -> float:
    """Proportional KL controller (Ziegler et al. 2019): moves the coefficient towards the
    per-sequence KL target, at most +-20% of the error per horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_rollouts / horizon)
