"""PPO log-probs and entropies from the chunked head (losses.token_logprobs, as
roles.response_logprobs runs it) against the full-logits formula it replaced, values and
gradients, in float32."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.rl import roles
from llava_jax.rl.batches import Rollout
from llava_jax.train.losses import token_logprobs
from llava_jax.models.lora import Adapter, forward

B, N, D, V = 3, 13, 16, 40
TEMPERATURE = 0.7


def _full_formula(logits, tokens, temperature):
    """roles.response_logprobs before the chunked head: log_softmax of the whole [B, N, V]."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _close(a, b, rtol=1e-5, atol=1e-6):
    """Equal to float32 rounding: relative to the larger array's scale."""
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 5, 13, 64])  # 5 does not divide N = 13; 64 > N: one chunk
def test_values_and_gradients_match_the_full_logits(chunk):
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(B, N, D), jnp.float32)
    kernel = jnp.asarray(0.25 * rng.randn(D, V), jnp.float32)  # logits ~ N(0, 1): spread-out distributions
    tokens = jnp.asarray(rng.randint(0, V, size=(B, N)), jnp.int32)
    weights = jnp.asarray(rng.randn(B, N), jnp.float32)  # a cotangent that differs per token

    def chunked(h, k):
        return token_logprobs(lambda x: x @ k, h, tokens, temperature=TEMPERATURE, chunk=chunk)

    def full(h, k):
        return _full_formula(h @ k, tokens, TEMPERATURE)

    got, want = chunked(hidden, kernel), full(hidden, kernel)
    _close(got[0], want[0])
    _close(got[1], want[1])
    assert float(jnp.min(want[1])) > 0.1  # non-degenerate distributions: the entropy check means something

    loss = lambda fn: lambda h, k: jnp.sum(weights * fn(h, k)[0])  # noqa: E731
    got_dh, got_dk = jax.grad(loss(chunked), argnums=(0, 1))(hidden, kernel)
    want_dh, want_dk = jax.grad(loss(full), argnums=(0, 1))(hidden, kernel)
    _close(got_dh, want_dh)
    _close(got_dk, want_dk)
    assert float(jnp.max(jnp.abs(want_dh))) > 1e-2  # gradients that are not ~0 either way

    # The entropy is a metric: it has no gradient (ppo.objective_sums only reports it).
    entropy_grad = jax.grad(lambda h: jnp.sum(chunked(h, kernel)[1]))(hidden)
    assert float(jnp.max(jnp.abs(entropy_grad))) == 0.0


def _world(tied: bool):
    """The tiny LLaVA in float32 (random policy adapter), a padded batch of 4 queries with images
    and right-padded random responses of N = 11 positions."""
    from scripts.bench_ppo_world import build_config, make_prompts, make_roles

    config = build_config("tiny", None).with_runtime(dtype="float32", param_dtype="float32")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=tied))
    base, adapters, _ = make_roles(config, 4)
    lora = adapters["policy"].config
    spec = roles.PPOSpec(config, lora, config, lora, lora, shared_base=True, temperature=TEMPERATURE)
    prompts = make_prompts(config, 4, 6)  # rows 1..3 left padded by 1..3
    rng = np.random.RandomState(2)
    n = 11
    lengths = np.array([11, 7, 1, 4])
    mask = np.arange(n)[None] < lengths[:, None]
    response = np.where(mask, rng.randint(3, config.text.vocab_size - 1, size=(4, n)), 0).astype(np.int32)
    batch = Rollout(query_ids=jnp.asarray(prompts["query_ids"]), query_mask=jnp.asarray(prompts["query_mask"]),
                    response=jnp.asarray(response), response_mask=jnp.asarray(mask))
    base = jax.tree_util.tree_map(jnp.asarray, base)
    features = roles.vision_features(config, base, jnp.asarray(prompts["pixel_values"]))
    policy = jax.tree_util.tree_map(jnp.asarray, adapters["policy"].params)
    return spec, base, policy, batch, features


def _old_response_logprobs(spec, base, adapter_params, batch, features):
    adapter = Adapter(adapter_params, spec.policy_lora)
    hidden = roles._response_hidden(spec.policy_config, base, adapter, batch.query_ids, batch.query_mask,
                                    batch.response, batch.response_mask, features)
    logits = forward(spec.policy_config, base, adapter, hidden, method="logits")
    return _full_formula(logits, batch.response, spec.temperature)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
def test_response_logprobs_match_the_full_logits_on_a_padded_batch(tied, monkeypatch):
    monkeypatch.setattr(roles, "LOGPROB_CHUNK", 4)  # 3 chunks over N = 11, the last one padded
    spec, base, policy, batch, features = _world(tied)
    weights = jnp.asarray(np.random.RandomState(3).randn(*batch.response.shape), jnp.float32)

    def objective(fn):
        def f(adapter_params, base):
            logp, entropy = fn(spec, base, adapter_params, batch, features)
            return jnp.sum(jnp.where(batch.response_mask, weights * logp, 0.0)), (logp, entropy)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, (got_logp, got_entropy)), got_grads = objective(roles.response_logprobs)(policy, base)
    (_, (want_logp, want_entropy)), want_grads = objective(_old_response_logprobs)(policy, base)
    _close(got_logp, want_logp)
    _close(got_entropy, want_entropy)
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got_grads)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
    assert flat_got.keys() == flat_want.keys()
    for path, want in flat_want.items():
        _close(flat_got[path], want, atol=1e-5)
    # The gradients reach the LoRA weights and the head (the embedding when tied).
    head_key = "embed_tokens" if tied else "lm_head"
    head_grad = jax.tree_util.tree_leaves(want_grads[1]["llm"][head_key])[0]
    assert float(jnp.max(jnp.abs(head_grad))) > 1e-3
    lora_grad = jax.tree_util.tree_leaves(want_grads[0])
    assert max(float(jnp.max(jnp.abs(g))) for g in lora_grad) > 1e-4
