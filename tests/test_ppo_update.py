"""The PPO update's old log-probs and values (ppo.ppo_loss_sums): while the trained params are
still the ones the rollout was scored with, the update takes them from its own forward (the
ratio exactly 1 without a second policy forward); once the params moved, from the rollout.
On the tiny random world of scripts/bench_ppo_world.py."""
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
    return ours, {k: v for k, v in rollout.items() if k in ours.update_keys}


def _sums(ours, hyper, batch, rollout_params):
    return jax.jit(lambda b, r: ppo.ppo_loss_sums(ours.spec, hyper, ours.state.params, ours.frozen, b, r)[1])(
        batch, rollout_params)


def test_unchanged_params_read_their_own_forward(world):
    ours, batch = world
    mask = batch["response_mask"].astype(bool)
    # Old log-probs and values off by more than the clip ranges: any use of them shows.
    noisy = {**batch, "logprobs": jnp.where(mask, batch["logprobs"] - 0.5, 0.0), "values": batch["values"] + 0.5}
    params = ours.state.params
    same = _sums(ours, ours.hyper, noisy, params)
    assert float(same["approx_kl"]) == 0.0 and float(same["policy_clipfrac"]) == 0.0
    assert float(same["value_clipfrac"]) == 0.0
    moved = jax.tree_util.tree_map(lambda x: x + 1e-3, params)  # the rollout came from other params
    other = _sums(ours, ours.hyper, noisy, moved)
    assert float(other["approx_kl"]) > 1e-3 and float(other["value_clipfrac"]) > 0
    sampler = ours.hyper.__class__(**{**ours.hyper.__dict__, "exact_ratio": False})  # old_logprobs = "sampler"
    assert float(_sums(ours, sampler, noisy, params)["approx_kl"]) > 1e-3
    with pytest.raises(ValueError, match="needs rollout_params"):  # exact_ratio never falls back silently
        ppo.ppo_loss_sums(ours.spec, ours.hyper, params, ours.frozen, batch, None)


def test_first_update_has_ratio_one_and_later_ones_do_not(world):
    ours, batch = world
    rows = batch["advantages"].shape[0]
    metrics = ours.update(batch, [np.arange(rows), np.arange(rows)[::-1]], rows // 2, {})
    assert metrics[0]["approx_kl"] == 0.0 and metrics[0]["policy_clipfrac"] == 0.0
    assert all(m["approx_kl"] > 0.0 for m in metrics[1:])  # lr 3e-5: every later update sees moved params
