"""The fused head cross-entropy (llava_jax/train/losses.py) against the loss on full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models import lora
from llava_jax.models import trainable
from llava_jax.train.losses import IGNORE_INDEX, head_cross_entropy, token_cross_entropy
from llava_jax.models import llava
from llava_jax.train.sft import sft_loss_sums
from llava_jax.train.state import ModelSpec

B, T, D, V = 4, 24, 16, 50


def _labels(seed=0):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, V, size=(B, T)).astype(np.int32)
    labels[0, :7] = IGNORE_INDEX  # a masked prompt
    labels[1] = IGNORE_INDEX  # no target at all
    labels[2, ::3] = IGNORE_INDEX  # scattered holes
    return labels  # row 3: every position a target


def _reference(hidden, kernel, labels, weights, tied):
    logits = hidden @ (kernel.T if tied else kernel)
    ce, tokens = token_cross_entropy(logits, labels, weights)
    hit = (jnp.argmax(logits[:, :-1], -1) == labels[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX) & (weights[:, None] > 0)
    return ce, tokens, jnp.sum(hit).astype(jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
@pytest.mark.parametrize("buckets", [1, 4, 5, 16])  # 5: chunks of 5 slots, the last one reaching past T = 24
def test_sums_and_gradients_match_the_full_logits_loss(tied, buckets):
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(B, T, D), jnp.float32)
    kernel = jnp.asarray(rng.randn(*((V, D) if tied else (D, V))), jnp.float32)
    labels = jnp.asarray(_labels())
    weights = jnp.asarray([1, 1, 0, 1])  # item 2 ignored
    fused = lambda h, k: head_cross_entropy(h, k, labels, weights, tied=tied, buckets=buckets)  # noqa: E731
    ref = lambda h, k: _reference(h, k, labels, weights, tied)  # noqa: E731
    for got, want in zip(jax.jit(fused)(hidden, kernel), jax.jit(ref)(hidden, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    grad = lambda f: jax.jit(jax.grad(lambda h, k: f(h, k)[0] * 0.5, argnums=(0, 1)))(hidden, kernel)  # noqa: E731
    for got, want in zip(grad(fused), grad(ref)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Either input alone (a frozen head, or frozen states) gets the same gradient. Jitted, as
    # everywhere else: op-by-op, every primitive of the fused loss compiles on its own (slow).
    only_h = lambda f: jax.jit(jax.grad(lambda h: f(h, kernel)[0]))(hidden)  # noqa: E731
    np.testing.assert_allclose(only_h(fused), only_h(ref), rtol=1e-5, atol=1e-6)


def test_accuracy_breaks_ties_like_argmax():
    """All-zero states give all-equal logits: only target 0, the first maximum, is a hit."""
    hidden = jnp.zeros((1, 6, D)).at[0, 4:].set(1.0)
    kernel = jnp.asarray(np.random.RandomState(0).randn(D, V), jnp.float32)
    labels = jnp.asarray([[0, 0, 7, 0, 3, 1]])  # targets of positions 0..4: 0, 7, 0, 3, 1
    got = jax.jit(head_cross_entropy)(hidden, kernel, labels, jnp.ones((1,)))
    want = jax.jit(_reference, static_argnums=4)(hidden, kernel, labels, jnp.ones((1,)), False)
    assert float(want[2]) >= 2  # the two tied rows with target 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_no_targets_gives_zero_loss_and_gradients():
    hidden = jnp.ones((B, T, D))
    kernel = jnp.ones((D, V))
    labels = jnp.full((B, T), IGNORE_INDEX)
    ce, tokens, correct = jax.jit(head_cross_entropy)(hidden, kernel, labels, jnp.ones((B,)))
    assert float(ce) == float(tokens) == float(correct) == 0.0
    loss = lambda h, k: head_cross_entropy(h, k, labels, jnp.ones((B,)))[0]  # noqa: E731
    dh, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, kernel)
    assert not np.any(dh) and not np.any(dk)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_loss_gradients_match_the_full_logits_loss(mode):
    config = llava.tiny_config()
    base = llava.init_params(config, jax.random.PRNGKey(0))
    n = config.num_image_tokens
    rng = np.random.RandomState(0)
    ids = rng.randint(3, config.text.vocab_size - 2, size=(2, n + 12)).astype(np.int32)
    ids[:, :n] = config.image_token_index
    labels = ids.copy()
    labels[:, :n + 3] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids), "valid": np.ones(2, np.int32),
             "pixel_values": rng.randn(2, config.vision.image_size, config.vision.image_size, 3).astype(np.float32)}
    train, frozen = trainable.split_base(base, ["projector", "llm"] if mode == "full" else [])
    params, spec = ({"base": train}, ModelSpec(config)) if mode == "full" else ({}, None)
    if mode == "lora":
        cfg = lora.LoraConfig(rank=4, alpha=8.0)
        adapter = lora.init_adapter(base, cfg, jax.random.PRNGKey(1))
        # A nonzero `b`, so the adapters change the loss and get gradients through every layer.
        adapter_params = jax.tree_util.tree_map(lambda x: x + 0.05, adapter.params)
        params, spec = {"adapter": adapter_params}, ModelSpec(config, cfg)

    def reference(p):
        b = trainable.join_base(p["base"], frozen) if "base" in p else frozen
        a = lora.Adapter(p["adapter"], spec.lora) if "adapter" in p else None
        logits = lora.forward(config, b, a, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        return token_cross_entropy(logits, batch["labels"], batch["valid"])[0]

    fused = lambda p: sft_loss_sums(spec, p, frozen, batch, jax.random.PRNGKey(2))[0]  # noqa: E731
    np.testing.assert_allclose(jax.jit(fused)(params), jax.jit(reference)(params), rtol=1e-6)
    got, want = jax.jit(jax.grad(fused))(params), jax.jit(jax.grad(reference))(params)
    flat_got, flat_want = trainable.flat_leaves(got), trainable.flat_leaves(want)
    assert flat_got.keys() == flat_want.keys()
    for path, g in flat_got.items():
        scale = float(np.abs(flat_want[path]).max()) + 1e-12
        assert float(np.abs(g - flat_want[path]).max()) / scale <= 1e-5, path
