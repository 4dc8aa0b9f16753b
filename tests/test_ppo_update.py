"""The PPO update's old log-probs and values (ppo.ppo_loss_sums): while the loop says the trained
params are still the ones the rollout was scored with (the first update of a PPO step, and those
after updates at learning rate 0), the update takes them from its own forward (the ratio exactly
1 without a second policy forward); once the params moved, from the rollout. On the tiny random
world of scripts/bench_ppo_world.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.rl import ppo


@pytest.fixture(scope="module")
def world():
    from scripts.bench_ppo_world import OursPPO, build_config, make_prompts, make_roles

    # test_bench_scripts.py's bench_ppo shapes: its programs are in the session's compile cache.
    config = build_config("tiny", None)
    base, adapters, head_of = make_roles(config, 8)
    ours = OursPPO(config, base, adapters, head_of, response_len=8, dtype="float32",
                   rating_ids=np.arange(3, 51, dtype=np.int32), cut_ids=tuple(range(3, 103)))
    rollout = ours.rollout(make_prompts(config, 4, 16), 0, {})
    return ours, rollout.for_update()


def _sums(ours, hyper, batch, params_unchanged):
    return jax.jit(lambda b, u: ppo.ppo_loss_sums(ours.spec, hyper, ours.state.params, ours.frozen, b, u)[1])(
        batch, params_unchanged)


def test_unchanged_params_read_their_own_forward(world):
    ours, batch = world
    mask = batch.response_mask.astype(bool)
    # Old log-probs and values off by more than the clip ranges: any use of them shows.
    noisy = batch.replace(logprobs=jnp.where(mask, batch.logprobs - 0.5, 0.0), values=batch.values + 0.5)
    same = _sums(ours, ours.hyper, noisy, True)
    assert float(same["approx_kl"]) == 0.0 and float(same["policy_clipfrac"]) == 0.0
    assert float(same["value_clipfrac"]) == 0.0
    other = _sums(ours, ours.hyper, noisy, False)  # the params moved since the rollout
    assert float(other["approx_kl"]) > 1e-3 and float(other["value_clipfrac"]) > 0
    sampler = ours.hyper.__class__(**{**ours.hyper.__dict__, "exact_ratio": False})  # old_logprobs = "sampler"
    assert float(_sums(ours, sampler, noisy, True)["approx_kl"]) > 1e-3


def test_the_loop_says_unchanged_while_every_earlier_update_ran_at_lr_zero():
    from llava_jax.rl import setup as ppo_setup

    seen = []

    def step_fn(state, frozen, minibatch, params_unchanged):
        seen.append(params_unchanged)
        return state, {}

    rollout = {"x": jnp.arange(4)}
    orders = [np.arange(4), np.arange(4)]
    for lrs, expected in (([0.0, 0.0, 1e-5, 1e-5], [True, True, True, False]),
                          ([1e-5, 0.0, 0.0, 0.0], [True, False, False, False])):
        seen.clear()
        ppo_setup.minibatch_updates(step_fn, None, {}, rollout, orders, 2, lrs)
        assert seen == expected
    schedule = lambda count: jnp.where(count < 3, 0.0, 1e-5 * count)  # noqa: E731
    assert ppo_setup.update_learning_rates(schedule, 2, 3) == [0.0, pytest.approx(3e-5), pytest.approx(4e-5)]


def test_first_update_has_ratio_one_and_later_ones_do_not(world):
    ours, batch = world
    rows = batch.advantages.shape[0]
    metrics = ours.update(batch, [np.arange(rows), np.arange(rows)[::-1]], rows // 2, {})
    assert metrics[0]["approx_kl"] == 0.0 and metrics[0]["policy_clipfrac"] == 0.0
    assert all(m["approx_kl"] > 0.0 for m in metrics[1:])  # lr 3e-5: every later update sees moved params
