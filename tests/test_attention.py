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


@pytest.mark.slow
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


# --- model.attention = "flash": the Pallas splash kernel (interpret mode on CPU) ----------------

def _padded(t, heads, kv_heads, seed=0, d=16):
    """A left-padded row, a right-padded row (as the SFT loader pads) and a full one."""
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(3, t, heads, d), jnp.float32)
    k, v = (jnp.asarray(rng.randn(3, kv_heads, t, d), jnp.float32) for _ in range(2))
    valid = np.ones((3, t), np.int32)
    valid[0, :7], valid[1, t - 9:] = 0, 0
    return q, k, v, valid


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_flash_values_and_gradients_match_the_xla_path(heads, kv_heads):
    from llava_jax.models.flash_attention import flash_attention

    q, k, v, valid = _padded(150, heads, kv_heads)  # two 128-tiles, the second one ragged
    mask = causal_padding_mask(jnp.asarray(valid))
    rows = jnp.asarray(valid, jnp.float32)[:, :, None, None]  # pad query rows are don't-care
    probe = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * rows
    flash = lambda q, k, v: flash_attention(q, k, v, jnp.asarray(valid, bool), backend="cpu")  # noqa: E731
    xla = lambda q, k, v: causal_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(flash(q, k, v) * rows, xla(q, k, v) * rows, atol=2e-6)
    got = jax.grad(lambda *a: jnp.sum(flash(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(xla(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_flash_model_forward_and_kv_cache_generation_match_xla():
    """The whole tiny LLaVA with flash attention: logits at every valid position equal the XLA
    path's, and the KV-cache sampler (which stays on the XLA path) gives the same greedy tokens
    on the flash-configured model."""
    from llava_jax.models import lora
    from llava_jax.models.llava import init_params, tiny_config
    from llava_jax.generate.sampling import SamplingConfig, generate

    xla_cfg, flash_cfg = tiny_config(), tiny_config(attention="flash")
    base = init_params(xla_cfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    n_img = xla_cfg.num_image_tokens
    ids = rng.randint(3, 400, size=(2, 1 + n_img + 20)).astype(np.int32)
    ids[:, 1:1 + n_img] = xla_cfg.image_token_index
    mask = np.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0  # left padding
    ids[0, 5], ids[0, 6:6 + n_img] = 1, xla_cfg.image_token_index
    size = xla_cfg.vision.image_size
    pixels = rng.randn(2, size, size, 3).astype(np.float32)
    logits = {name: np.asarray(lora.forward(c, base, None, ids, pixels, mask)) for name, c in
              (("xla", xla_cfg), ("flash", flash_cfg))}
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits["flash"][valid], logits["xla"][valid], atol=2e-5)
    greedy = SamplingConfig.greedy(max_new_tokens=6, eos_id=None, cache_dtype="float32")
    tokens = [np.asarray(generate(c, base, None, ids, mask, pixels, jax.random.PRNGKey(0), greedy)["tokens"])
              for c in (xla_cfg, flash_cfg)]
    np.testing.assert_array_equal(tokens[0], tokens[1])


@pytest.mark.slow
def test_accelerator_shapes_compute_what_the_cpu_shapes_compute():
    """`cpu_shapes` (the model config's runtime field; settings `model.cpu_shapes`) only changes
    the forms XLA:CPU is given: the plain forms TPUs and GPUs run give the same logits, losses
    and greedy tokens, here on this CPU. Off is the config's default."""
    from llava_jax.models import lora
    from llava_jax.train import losses
    from llava_jax.models.llava import init_params, tiny_config
    from llava_jax.generate.sampling import SamplingConfig, _use_unstacked, generate

    assert not tiny_config().text.cpu_shapes and not tiny_config().vision.cpu_shapes
    base = init_params(tiny_config(), jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 400, size=(2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    labels = np.where(mask == 1, ids, -100)
    size = tiny_config().vision.image_size
    pixels = rng.randn(2, size, size, 3).astype(np.float32)
    greedy = SamplingConfig.greedy(max_new_tokens=5, eos_id=None, cache_dtype="float32")
    out = {}
    for on in (True, False):
        config = tiny_config(cpu_shapes=on)
        assert config.text.cpu_shapes is on and config.vision.cpu_shapes is on
        logits = np.asarray(lora.forward(config, base, None, ids, pixels, mask))
        hidden = lora.forward(config, base, None, ids, pixels, mask, method="hidden")
        sums = losses.head_cross_entropy(hidden, base["llm"]["lm_head"]["kernel"], jnp.asarray(labels), jnp.ones(2))
        tokens = np.asarray(generate(config, base, None, ids, mask, pixels, jax.random.PRNGKey(0), greedy)["tokens"])
        out[on] = (logits, sums, tokens, _use_unstacked(config, base, None, greedy))
    np.testing.assert_allclose(out[False][0][mask == 1], out[True][0][mask == 1], atol=2e-5)
    for a, b in zip(out[False][1], out[True][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_array_equal(out[False][2], out[True][2])
    assert out[True][3] and not out[False][3]


def test_cpu_shapes_is_resolved_once_from_the_setting():
    """`model.cpu_shapes`: auto is on for CPU devices only (a compile check's TPU or GPU target
    gets the accelerator forms), on / off as set; it reaches both towers through the runtime
    knobs and is never written into a checkpoint's config."""
    from configs.tiny_sft import get_config
    from llava_jax.models.llava import LlavaConfig, tiny_config
    from llava_jax.settings import RunSettings, cpu_shapes_on, describe_cpu_shapes, resolve_cpu_shapes

    s = RunSettings.from_config(get_config())
    assert s.model.cpu_shapes == "auto"
    assert resolve_cpu_shapes(s, "cpu").model.cpu_shapes == "on"
    for platform in ("tpu", "gpu"):
        assert resolve_cpu_shapes(s, platform).model.cpu_shapes == "off"
    for choice, platform in (("on", "tpu"), ("off", "cpu")):
        forced = resolve_cpu_shapes(s.replace(model={"cpu_shapes": choice}), platform)
        assert forced.model.cpu_shapes == choice
    assert describe_cpu_shapes("auto", "off", "tpu") == "model.cpu_shapes: off (auto on tpu devices)"
    with pytest.raises(ValueError, match="model.cpu_shapes='yes'"):
        cpu_shapes_on("yes", "cpu")
    on = tiny_config(**resolve_cpu_shapes(s, "cpu").model.runtime_knobs())
    off = tiny_config(**resolve_cpu_shapes(s, "tpu").model.runtime_knobs())
    assert on.text.cpu_shapes and on.vision.cpu_shapes and not off.text.cpu_shapes and not off.vision.cpu_shapes
    data = on.to_dict()
    assert "cpu_shapes" not in data["text"] and "cpu_shapes" not in data["vision"]
    assert LlavaConfig.from_dict(data) == off
