"""Blocked causal attention (hand-written VJP) against the general `layers.attention`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.causal_attention import causal_attention
from llava_jax.models.layers import attention
from llava_jax.models.llama import causal_padding_mask


def _inputs(t, heads, kv_heads, pads, seed=0, d=16):
    rng = np.random.RandomState(seed)
    b = len(pads)
    q = jnp.asarray(rng.randn(b, t, heads, d), jnp.float32)
    k = jnp.asarray(rng.randn(b, kv_heads, t, d), jnp.float32)
    v = jnp.asarray(rng.randn(b, kv_heads, t, d), jnp.float32)
    valid = np.ones((b, t), np.int32)
    for row, pad in enumerate(pads):
        valid[row, :pad] = 0
    return q, k, v, causal_padding_mask(jnp.asarray(valid)), valid


@pytest.mark.parametrize("t,block", [(20, 128), (70, 16), (64, 32)], ids=["one-block", "ragged-blocks", "even-blocks"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_values_and_gradients_match_attention(t, block, heads, kv_heads):
    q, k, v, mask, valid = _inputs(t, heads, kv_heads, pads=(0, 5, 33 if t > 33 else 3))
    rows = jnp.asarray(valid, jnp.float32)[:, :, None, None]  # left-pad query rows are don't-care
    probe = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * rows

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * probe)

    ours = lambda q, k, v: causal_attention(q, k, v, mask, block=block)  # noqa: E731
    ref = lambda q, k, v: attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v) * rows, ref(q, k, v) * rows, rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_close_to_float32():
    q, k, v, mask, _ = _inputs(48, 4, 2, pads=(0, 0), d=8)
    f32 = causal_attention(q, k, v, mask, block=16)
    bf16 = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, block=16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=5e-2)
    grads = jax.grad(lambda q: jnp.sum(causal_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask,
                                                        block=16).astype(jnp.float32)))(q.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))
