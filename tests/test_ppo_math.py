"""PPO math against NumPy references written from the formulas (hand-made arrays, 1e-6),
the symbolic reward terms, and the reward model's input for a known item."""
import numpy as np
import pytest

import jax.numpy as jnp

from llava_jax.rl.batches import Rollout
from llava_jax.rl import fact_reward, ppo, setup as ppo_setup
from llava_jax.settings import PPOSettings
from llava_jax.data.templates import USER, Turn

RNG = np.random.default_rng(0)
B, N = 3, 6
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
LOGP = RNG.normal(-2, 1, (B, N)).astype(np.float32)
REF = RNG.normal(-2, 1, (B, N)).astype(np.float32)
VALUES = RNG.normal(0, 1, (B, N)).astype(np.float32)
SCORE = np.array([1.5, -0.5, 2.0], np.float32)


def _hyper(**ppo_fields) -> ppo.PPOHyper:
    """PPOHyper as a run builds it (rl.setup.ppo_hyper) from the settings tree's `ppo` defaults
    with `ppo_fields` changed."""
    return ppo_setup.ppo_hyper(PPOSettings(**ppo_fields))


def np_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def np_whiten(x, mask, shift_mean=True):
    v = x[mask]
    out = (x - v.mean()) / (v.std() + 1e-8)
    if not shift_mean:
        out = out + v.mean()
    return np.where(mask, out, 0.0)


@pytest.mark.parametrize("estimator", ["k1", "k1_unclamped", "k3"])
def test_kl_estimators(estimator):
    d = LOGP - REF
    expected = {"k1": np.maximum(d, 0), "k1_unclamped": d, "k3": np.exp(REF - LOGP) - 1 - (REF - LOGP)}[estimator]
    np.testing.assert_allclose(ppo.kl_estimate(LOGP, REF, estimator), expected, atol=1e-6)


def test_shaped_rewards_put_the_score_on_the_last_valid_token():
    kl = np.maximum(LOGP - REF, 0) * MASK
    expected = -0.1 * kl
    for b in range(B):
        expected[b, MASK[b].sum() - 1] += SCORE[b]
    np.testing.assert_allclose(ppo.shape_rewards(jnp.asarray(kl), SCORE, MASK, 0.1), expected, atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_gae_matches_the_reference_loop(gamma, lam):
    rewards = RNG.normal(0, 1, (B, N)).astype(np.float32) * MASK
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(VALUES), jnp.asarray(MASK), gamma, lam)
    ref_adv, ref_ret = np_gae(rewards, VALUES, MASK, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_over_valid_tokens(shift_mean):
    x = RNG.normal(3, 2, (B, N)).astype(np.float32)
    np.testing.assert_allclose(ppo.whiten(jnp.asarray(x), jnp.asarray(MASK), shift_mean), np_whiten(x, MASK, shift_mean),
                               atol=1e-6)


def test_clipped_policy_and_value_losses():
    adv = RNG.normal(0, 1, (B, N)).astype(np.float32)
    new = LOGP + RNG.normal(0, 0.3, (B, N)).astype(np.float32)
    ratio = np.exp(new - LOGP)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    loss, clipped, approx = ppo.policy_loss_terms(jnp.asarray(new), jnp.asarray(LOGP), jnp.asarray(adv), 0.2)
    np.testing.assert_allclose(loss, pg, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped) > 0, -adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio)
    np.testing.assert_allclose(approx, 0.5 * (new - LOGP) ** 2, atol=1e-6)
    assert 0 < np.mean(clipped) < 1  # both branches exercised

    returns = RNG.normal(0, 2, (B, N)).astype(np.float32)
    vnew = VALUES + RNG.normal(0, 0.5, (B, N)).astype(np.float32)
    vclip = np.clip(vnew, VALUES - 0.2, VALUES + 0.2)
    vf = 0.5 * np.maximum((vnew - returns) ** 2, (vclip - returns) ** 2)
    vloss, vclipped = ppo.value_loss_terms(jnp.asarray(vnew), jnp.asarray(VALUES), jnp.asarray(returns), 0.2)
    np.testing.assert_allclose(vloss, vf, atol=1e-5)
    assert 0 < np.mean(vclipped) < 1


def test_compute_advantages_end_to_end():
    hyper = _hyper(kl_estimator="k1", reward_scale=10.0, gamma=1.0, lam=1.0, whiten_over_pads=False,
                   loss_over_pads=False)
    rollout = {"response_mask": MASK, "logprobs": LOGP, "ref_logprobs": REF, "values": VALUES, "score": SCORE,
               "valid": np.ones(B, np.int32)}
    out, metrics = ppo.compute_advantages(hyper, Rollout(**{k: jnp.asarray(v) for k, v in rollout.items()}), jnp.float32(0.1))
    kl = np.maximum(LOGP - REF, 0) * MASK
    shaped = -0.1 * kl
    for b in range(B):
        shaped[b, MASK[b].sum() - 1] += SCORE[b]
    adv, ret = np_gae(shaped * 10.0, VALUES, MASK, 1.0, 1.0)
    np.testing.assert_allclose(out.rewards, shaped * 10.0 * MASK, atol=1e-5)
    np.testing.assert_allclose(out.returns, ret, atol=1e-5)
    np.testing.assert_allclose(out.advantages, np_whiten(adv, MASK), atol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl.sum(1).mean(), atol=1e-6)
    np.testing.assert_allclose(metrics["kl_penalty"], -0.1 * kl.sum(1).mean(), atol=1e-6)


def test_whitened_rewards_replace_scaling():
    hyper = _hyper(whiten_rewards=True, whiten_over_pads=False, loss_over_pads=False)
    rollout = {"response_mask": MASK, "logprobs": LOGP, "ref_logprobs": REF, "values": VALUES, "score": SCORE,
               "valid": np.ones(B, np.int32)}
    out, _ = ppo.compute_advantages(hyper, Rollout(**{k: jnp.asarray(v) for k, v in rollout.items()}), jnp.float32(0.1))
    shaped = -0.1 * np.maximum(LOGP - REF, 0) * MASK
    for b in range(B):
        shaped[b, MASK[b].sum() - 1] += SCORE[b]
    np.testing.assert_allclose(out.rewards, np_whiten(shaped, MASK, shift_mean=False), atol=1e-5)


@pytest.mark.parametrize("response,caption_type,expected", [
    ("C. circle", 4, 1.0), ("The correct option is C.", 4, 1.0), ("C", 4, 0.0), ("A. cross", 4, 0.0),
    ("No, there is not.", 6, 0.5), ("Yes, there is.", 6, -0.5), ("There is none.", 6, 0.0),
    ("Yes.", 7, 0.0), ("A red square.", 1, 0.0), ("  B. triangle", 3, 1.0),
])
def test_correctness_bonus(response, caption_type, expected):
    assert fact_reward.correctness(response, caption_type) == expected


def test_score_terms_compose_as_the_reference():
    weights = fact_reward.RewardWeights(rm_weight=1.0, correct_bonus=2.0, length_bonus=-10.0, no_stop_penalty=-8.0)
    rm = np.array([0.3, -1.0]); correct = np.array([1.0, -0.5]); frac = np.array([10 / 896, 896 / 896])
    bonus = np.array([1.0, 2.0]); stop = np.array([1.0, 0.0])
    terms = fact_reward.score_terms(rm, correct, frac, bonus, stop, weights)
    expected = rm + 2.0 * correct - 10.0 * frac * bonus - 8.0 * (1 - stop)
    np.testing.assert_allclose(terms["score"], expected, atol=1e-12)
    np.testing.assert_allclose(terms["no_stop_penalty"], [0.0, -8.0])
    np.testing.assert_allclose(terms["length_penalty"], [-10 * 10 / 896, -20.0])


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 512) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 512) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))


def _sampled(tokenizer, query: str, responses: list[str], stopped: list[bool], n_image=4, width=40):
    """Left-padded query ids and right-padded response ids, as a rollout holds them."""
    from llava_jax.data.templates import encode_prompt

    q = encode_prompt([Turn(USER, query)], tokenizer, "vicuna_v1", num_image_tokens=n_image,
                      image_token_index=511).ids
    query_ids = np.zeros((len(responses), len(q) + 2), np.int32)
    query_mask = np.zeros_like(query_ids)
    query_ids[:, 2:], query_mask[:, 2:] = q, 1
    response = np.zeros((len(responses), width), np.int32)
    response_mask = np.zeros_like(response)
    for i, (text, stop) in enumerate(zip(responses, stopped)):
        ids = tokenizer.encode(text) + ([tokenizer.eos_id] if stop else [])
        response[i, :len(ids)], response_mask[i, :len(ids)] = ids, 1
    return query_ids, query_mask, response, response_mask


def test_reward_model_input_of_a_known_item():
    """The bug that broke users of the original: the RM must see the conversation, the rating
    turn with the item's captions, and be read at the last token of the score phrase."""
    from llava_jax.data import load_tokenizer
    from llava_jax.data.reward_prompt import RewardPrompt

    tokenizer = load_tokenizer("data/toy/tokenizer")
    prompt = RewardPrompt.from_file()
    captions = ["A red square in the top left.", "Two shapes on grey.", "A blue circle at the bottom."]
    meta = {"image": "shapes_000.png", "captions": captions}
    sampled = _sampled(tokenizer, "What shapes are in the image?", ["A red square and a blue circle.", ""],
                       [True, True])
    ids, mask = fact_reward.reward_inputs([meta, None], *sampled, tokenizer, prompt, with_facts=True,
                                          template="vicuna_v1", seed=(0, 1, 0, 0), pad_id=tokenizer.pad_id,
                                          pad_multiple=64)
    assert ids.shape[1] % 64 == 0 and mask[0].sum() < ids.shape[1] and mask[1].sum() == 1
    row = ids[0, :mask[0].sum()]
    assert (row == 511).sum() == 4 and row[-1] == tokenizer.encode(prompt.assistant)[-1]
    order = fact_reward.shuffled_captions(captions, (0, 1, 0, 0, 0))
    expected_user = prompt.user_turn(order)
    expected = ("<s> A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: " + "\n"
                "What shapes are in the image? ASSISTANT: A red square and a blue circle.</s>USER: "
                + expected_user + " ASSISTANT: " + prompt.assistant)
    text = tokenizer.decode([int(t) for t in row if t != 511], skip_special_tokens=False)
    assert " ".join(text.replace("</s>", "</s> ").split()) == " ".join(expected.replace("</s>", "</s> ").split())
    positions = [text.index(c) for c in order]
    assert positions == sorted(positions)  # captions in the seeded order, all present
    assert order != captions or order != list(reversed(captions))
    no_facts, no_mask = fact_reward.reward_inputs([meta], *(x[:1] for x in sampled), tokenizer, prompt,
                                                  with_facts=False, template="vicuna_v1", seed=(0,),
                                                  pad_id=tokenizer.pad_id)
    plain = tokenizer.decode([int(t) for t, m in zip(no_facts[0], no_mask[0]) if m and t != 511])
    assert all(c not in plain for c in captions) and plain.endswith(prompt.assistant)


def test_relayout_image_tokens_for_another_tower():
    ids = np.array([[0, 0, 5, 9, 9, 7, 8], [5, 9, 9, 6, 6, 7, 8]], np.int32)
    mask = (np.arange(7)[None] >= np.array([[2], [0]])).astype(np.int32)
    out, out_mask = fact_reward.relayout_image_tokens(ids, mask, 9, 2, 4, pad_id=0)
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[0], [0, 0, 5, 9, 9, 9, 9, 7, 8])
    np.testing.assert_array_equal(out[1], [5, 9, 9, 9, 9, 6, 6, 7, 8])
    np.testing.assert_array_equal(out_mask[0], [0, 0, 1, 1, 1, 1, 1, 1, 1])
