"""KV-cache sampler: parity with the full forward and with HF generate, log-probs, top-k/top-p."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_hf
from llava_jax.models import lora
from llava_jax.convert import load_hf
from llava_jax.models.llama import init_cache, positions_from_mask
from llava_jax.generate.sampling import SamplingConfig, filter_logits, generate, generate_fn

NEW = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    hf = tiny_hf.llava_model("mlp2x_gelu", seed=3)
    hf.save_pretrained(root / "hf")
    config, base = load_hf(str(root / "hf"))
    return hf, config, base


def _prompts(config, with_image, pads=(0, 4, 2), text=5, seed=0):
    n = config.num_image_tokens if with_image else 0
    seq = 1 + n + text + max(pads)
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, tiny_hf.IMAGE_TOKEN, size=(len(pads), seq))
    mask = np.ones_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
        ids[b, pad] = 1
        ids[b, pad + 1:pad + 1 + n] = config.image_token_index
    pixels = rng.randn(len(pads), config.vision.image_size, config.vision.image_size, 3).astype(np.float32)
    return ids, mask, (pixels if with_image else None)


def test_cached_decode_logits_equal_full_forward(world):
    _, config, base = world
    ids, mask, pixels = _prompts(config, with_image=True)
    b, tp = ids.shape
    steps = 6
    follow = np.random.RandomState(1).randint(3, 90, size=(b, steps))
    full_ids = np.concatenate([ids, follow], 1)
    full_mask = np.concatenate([mask, np.ones_like(follow)], 1)
    # Jitted, as the sampler runs it (op by op, every primitive of every call would compile on its own).
    forward = jax.jit(lora.forward, static_argnums=0, static_argnames="method")
    full = np.asarray(forward(config, base, None, full_ids, pixels, full_mask))

    cache = init_cache(config.text, b, tp + steps, jnp.float32)
    kv_mask = np.concatenate([mask, np.zeros((b, steps), mask.dtype)], 1)
    pos = positions_from_mask(jnp.asarray(mask))
    hidden, cache = forward(config, base, None, ids, pixels, kv_mask, method="hidden", positions=pos,
                            cache=cache, cache_index=0)
    got = [np.asarray(forward(config, base, None, hidden, method="logits"))[:, -1]]
    for t in range(steps - 1):
        kv_mask[:, tp + t] = 1
        hidden, cache = forward(config, base, None, follow[:, t:t + 1], None, kv_mask, method="hidden",
                                positions=pos[:, -1:] + 1 + t, cache=cache, cache_index=tp + t)
        got.append(np.asarray(forward(config, base, None, hidden, method="logits"))[:, 0])
    for t, logits in enumerate(got):
        assert tiny_hf.rel_error(logits, full[:, tp - 1 + t]) <= 1e-5, t


@pytest.mark.parametrize("with_image,cpu_shapes", [(True, False), (False, False), (True, True)],
                         ids=["image", "text-only", "image-cpu-shapes"])
@pytest.mark.slow
def test_greedy_tokens_match_hf_generate(world, with_image, cpu_shapes):
    """cpu_shapes False: the TPU/GPU forms (load_hf's default); True: XLA:CPU's (folded query
    groups, unstacked decode layers)."""
    hf, config, base = world
    config = config.with_runtime(cpu_shapes=cpu_shapes)
    ids, mask, pixels = _prompts(config, with_image)
    sampling = SamplingConfig.greedy(max_new_tokens=NEW, eos_id=None, cache_dtype="float32")
    out = generate_fn(config, sampling)(base, None, ids, mask, pixels, jax.random.PRNGKey(0))
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                  do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=NEW)
    if with_image:
        kwargs["pixel_values"] = torch.tensor(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = hf.generate(**kwargs)[:, ids.shape[1]:].numpy()
    assert ref.shape == (3, NEW) and np.asarray(out["mask"]).all()
    np.testing.assert_array_equal(np.asarray(out["tokens"]), ref)


@pytest.mark.slow
def test_sampled_logprobs_and_stopping(world):
    _, config, base = world
    ids, mask, pixels = _prompts(config, with_image=True)
    temperature = 0.7
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=1.0, top_k=0, eos_id=None,
                              cache_dtype="float32")
    out = jax.jit(generate, static_argnums=(0, 7))(config, base, None, ids, mask, pixels, jax.random.PRNGKey(5),
                                                    sampling)
    tokens = np.asarray(out["tokens"])
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    logits = np.asarray(lora.forward(config, base, None, full_ids, pixels, full_mask))
    tp = ids.shape[1]
    expected = jax.nn.log_softmax(logits[:, tp - 1:-1] / temperature, axis=-1)
    expected = np.take_along_axis(np.asarray(expected), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out["logprobs"]), expected, rtol=1e-5, atol=1e-5)

    # A stop token ends each sequence at its first occurrence; the loop exits early when all stop.
    stop_id = int(tokens[0, 3])
    stopping = SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=1.0, top_k=0, eos_id=stop_id,
                              cache_dtype="float32")
    out2 = generate(config, base, None, ids, mask, pixels, jax.random.PRNGKey(5), stopping)
    t2, m2 = np.asarray(out2["tokens"]), np.asarray(out2["mask"])
    first = int(np.argmax(t2[0] == stop_id))
    assert first <= 3 and m2[0, :first + 1].all() and not m2[0, first + 1:].any() and (t2[0, first + 1:] == 0).all()
    for row, valid in zip(t2, m2):
        hits = np.flatnonzero(row[valid] == stop_id)
        assert len(hits) <= 1 and (len(hits) == 0 or hits[0] == valid.sum() - 1)
    assert int(out2["steps"]) == 12 or (~m2[:, -1]).all()


@pytest.mark.slow
def test_stop_sequence_and_adapter(world):
    _, config, base = world
    ids, mask, pixels = _prompts(config, with_image=False)
    greedy = SamplingConfig.greedy(max_new_tokens=10, eos_id=None, cache_dtype="float32")
    plain = np.asarray(generate(config, base, None, ids, mask, None, jax.random.PRNGKey(0), greedy)["tokens"])
    seq = tuple(int(x) for x in plain[1, 2:4])
    stopped = generate(config, base, None, ids, mask, None, jax.random.PRNGKey(0),
                       SamplingConfig.greedy(max_new_tokens=10, eos_id=None, cache_dtype="float32",
                                             stop_sequences=(seq,)))
    assert np.asarray(stopped["mask"])[1].sum() <= 4
    # A LoRA adapter changes what is sampled, and its merged weights sample the same tokens.
    adapter = lora.init_adapter(base, lora.LoraConfig(rank=4, alpha=8), jax.random.PRNGKey(1))
    adapter = lora.Adapter(jax.tree_util.tree_map(lambda x: x + 0.3, adapter.params), adapter.config)
    with_adapter = np.asarray(generate(config, base, adapter, ids, mask, None, jax.random.PRNGKey(0), greedy)["tokens"])
    merged = np.asarray(generate(config, lora.merge(base, adapter), None, ids, mask, None, jax.random.PRNGKey(0),
                                 greedy)["tokens"])
    assert not np.array_equal(with_adapter, plain)
    np.testing.assert_array_equal(with_adapter, merged)


def test_unstacked_layers_decode_like_the_scanned_layers(world):
    """The per-layer decode path (cpu_shapes' default) and the scanned one: same tokens and log-probs,
    with an adapter and sampling."""
    _, config, base = world
    ids, mask, pixels = _prompts(config, with_image=True)
    adapter = lora.init_adapter(base, lora.LoraConfig(rank=4, alpha=8), jax.random.PRNGKey(1))
    adapter = lora.Adapter(jax.tree_util.tree_map(lambda x: x + 0.1, adapter.params), adapter.config)
    outs = []
    for unstack in (False, True):
        sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=1.0, top_k=0, eos_id=None,
                                  cache_dtype="float32", unstack_layers=unstack)
        outs.append(generate(config, base, adapter, ids, mask, pixels, jax.random.PRNGKey(2), sampling))
    np.testing.assert_array_equal(np.asarray(outs[0]["tokens"]), np.asarray(outs[1]["tokens"]))
    np.testing.assert_allclose(np.asarray(outs[0]["logprobs"]), np.asarray(outs[1]["logprobs"]), rtol=1e-5, atol=1e-5)


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 50) * 2, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    for top_k, top_p in ((5, 1.0), (0, 0.6), (8, 0.9)):
        filtered = filter_logits(logits, top_k, top_p)
        draws = np.asarray(jax.vmap(lambda k: jax.random.categorical(k, filtered, axis=-1))(keys))  # [4000, 4]
        probs = np.asarray(jax.nn.softmax(logits, -1))
        for row in range(4):
            order = np.argsort(-probs[row])
            allowed = set(order[:top_k]) if top_k else set(order)
            if top_p < 1.0:
                cum = np.cumsum(probs[row][order])
                allowed &= set(order[:int(np.searchsorted(cum, top_p)) + 1])
            seen = set(draws[:, row].tolist())
            assert seen <= allowed, (top_k, top_p, row)
            assert len(seen) >= min(2, len(allowed))  # it samples, it is not argmax


def test_sampler_under_a_mesh_with_sharded_weights_and_cache(world):
    """(2, 2, 2) mesh over 8 forced CPU devices: same greedy tokens as one device."""
    from llava_jax import sharding

    _, config, base = world
    ids, mask, pixels = _prompts(config, with_image=True, pads=(0, 1, 2, 3, 4, 0, 1, 2))
    sampling = SamplingConfig.greedy(max_new_tokens=8, eos_id=None, cache_dtype="float32")
    single = np.asarray(generate_fn(config, sampling)(base, None, ids, mask, pixels, jax.random.PRNGKey(0))["tokens"])
    mesh = sharding.make_mesh((2, 2, 2))
    shards = sharding.param_shardings(config, base, mesh)
    sharded = jax.device_put(base, shards)
    assert sharded["llm"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    batch = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in (ids, mask, pixels)]
    with jax.set_mesh(mesh), sharding.activation_rules():  # set_mesh: flax sees the mesh (activation constraints)
        run = jax.jit(lambda p, i, m, x: generate(config, p, None, i, m, x, jax.random.PRNGKey(0), sampling))
        out = run(sharded, *batch)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), single)


@pytest.mark.slow
def test_the_image_placeholder_is_never_sampled(world):
    """Sampled, the placeholder id would be read as an image slot by every later teacher-forced
    pass. With the LM head pushed towards it (the favourite at many steps), greedy and sampled
    decoding still avoid it, and the log-probs stay those of the unmodified distribution (what
    those passes compute)."""
    _, config, base = world
    ids, mask, pixels = _prompts(config, with_image=True)
    index = config.image_token_index
    assert 0 <= index < config.text.vocab_size
    head = jnp.asarray(base["llm"]["lm_head"]["kernel"])
    pushed = {**base, "llm": {**base["llm"], "lm_head": {"kernel": head.at[:, index].add(5.0 * jnp.abs(head).max())}}}
    for temperature in (0.0, 1.0):
        sampling = SamplingConfig(max_new_tokens=6, temperature=temperature, top_p=1.0, top_k=0, eos_id=None,
                                  cache_dtype="float32")
        out = generate(config, pushed, None, ids, mask, pixels, jax.random.PRNGKey(2), sampling)
        tokens = np.asarray(out["tokens"])
        assert not (tokens == index).any()
        full_ids = np.concatenate([ids, tokens], 1)
        logits = np.asarray(lora.forward(config, pushed, None, full_ids, pixels,
                                         np.concatenate([mask, np.ones_like(tokens)], 1)))
        tp = ids.shape[1]
        scaled = logits[:, tp - 1:-1] / (temperature or 1.0)
        assert (scaled.argmax(-1) == index).mean() > 0.2  # unmasked, often every step's favourite
        expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(scaled, axis=-1)), tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(np.asarray(out["logprobs"]), expected, rtol=1e-4, atol=1e-4)
