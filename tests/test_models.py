"""Parity of our Flax CLIP, LLaMA and LLaVA with HF PyTorch on tiny random float32 weights.

Weights go through the real `load_hf`; errors are max |diff| / max |ref| over non-pad tokens.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_hf
from llava_jax.convert import load_hf
from llava_jax.models.clip import ClipVision
from llava_jax.models.llama import Llama, positions_from_mask
from llava_jax.models.llava import Llava, logical_axes


def _llama_logits(model, ids, mask):
    pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits.numpy()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    tiny_hf.save_clip(d)
    return d


# cpu_shapes False: the TPU/GPU forms (the config default); True: the XLA:CPU ones, on the
# cheapest case that folds query groups.
@pytest.mark.parametrize("kv_heads,extra,cpu_shapes", [
    (4, {}, False),  # plain multi-head attention
    (2, {}, False),  # grouped-query attention
    (1, {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
     False),
    (2, {"tie_word_embeddings": True}, False),
    (2, {}, True),
], ids=["mha", "gqa", "llama3-rope-mqa", "tied", "gqa-cpu-shapes"])
def test_llama_matches_hf(tmp_path, clip_dir, kv_heads, extra, cpu_shapes):
    torch.manual_seed(0)
    hf = torch_model = __import__("transformers").LlamaForCausalLM(tiny_hf.llama_config(kv_heads, **extra)).eval()
    tiny_hf._randomise_norms(hf)
    hf.save_pretrained(tmp_path / "llama")
    config, params = load_hf(str(tmp_path / "llama"), vision_tower=clip_dir)
    assert config.text.num_kv_heads == kv_heads
    assert ("lm_head" in params["llm"]) == (not extra.get("tie_word_embeddings", False))
    ids, mask = tiny_hf.left_padded_batch(seq=40, pads=[0, 5, 17])
    assert not config.text.cpu_shapes  # load_hf: the default runtime
    text = dataclasses.replace(config.text, cpu_shapes=cpu_shapes)
    ours = np.asarray(Llama(text).apply({"params": params["llm"]}, ids, mask))
    ref = _llama_logits(torch_model, ids, mask)
    assert tiny_hf.rel_error(ours, ref, mask) <= 1e-5


def test_left_padding_gives_the_unpadded_logits(tmp_path, clip_dir):
    """Positions follow the mask: a left-padded row equals the same row without padding."""
    tiny_hf.save_llama(str(tmp_path / "llama"))
    config, params = load_hf(str(tmp_path / "llama"), vision_tower=clip_dir)
    ids, mask = tiny_hf.left_padded_batch(seq=12, pads=[4])
    model = Llama(config.text)
    padded = np.asarray(model.apply({"params": params["llm"]}, ids, mask))[0, 4:]
    alone = np.asarray(model.apply({"params": params["llm"]}, ids[:, 4:], mask[:, 4:]))[0]
    np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-5)
    assert positions_from_mask(jnp.asarray(mask)).tolist() == [[0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("image_size", [28, 42], ids=["224-style-4-patches", "336-style-9-patches"])
def test_clip_every_layer_matches_hf(tmp_path, image_size):
    hf = tiny_hf.save_clip(str(tmp_path / "clip"), image_size=image_size)
    tiny_hf.save_llama(str(tmp_path / "llama"))
    config, params = load_hf(str(tmp_path / "llama"), vision_tower=str(tmp_path / "clip"))
    pixels = np.random.RandomState(0).randn(2, image_size, image_size, 3).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    model = ClipVision(config.vision)
    out = model.apply({"params": params["vision"]}, pixels, all_hidden_states=True)
    assert out["hidden_states"].shape[0] == len(ref.hidden_states) == 4
    for layer, ref_state in enumerate(ref.hidden_states):
        assert tiny_hf.rel_error(np.asarray(out["hidden_states"][layer]), ref_state.numpy()) <= 1e-5, layer
    assert tiny_hf.rel_error(np.asarray(out["pooled"]), ref.pooler_output.numpy()) <= 1e-5
    # The direct (sliced-stack) path for one layer gives the same states as the full stack.
    for layer in (-1, -2, 0, 1):
        direct = model.apply({"params": params["vision"]}, pixels, layer=layer)["selected"]
        np.testing.assert_allclose(np.asarray(direct), ref.hidden_states[layer].numpy(), rtol=0, atol=1e-5)


def _llava_batch(config, pads=(0, 3, 2), image=(True, True, False), text_len=6, seed=0):
    n = config.num_image_tokens
    seq = 1 + n + text_len + max(pads)
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, tiny_hf.IMAGE_TOKEN, size=(len(pads), seq))
    mask = np.ones_like(ids)
    for b, (pad, has_image) in enumerate(zip(pads, image)):
        ids[b, :pad], mask[b, :pad] = 0, 0
        if has_image:
            ids[b, pad + 1:pad + 1 + n] = config.image_token_index
    pixels = rng.randn(len(pads), config.vision.image_size, config.vision.image_size, 3).astype(np.float32)
    return ids, mask, pixels, np.array(image)


def _hf_llava_logits(model, ids, mask, pixels, has_image):
    pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos,
                     pixel_values=torch.tensor(pixels[has_image]).permute(0, 3, 1, 2)).logits.numpy()


@pytest.fixture(scope="module")
def llava_models(tmp_path_factory):
    out = {}
    for projector in ("mlp2x_gelu", "linear"):
        hf = tiny_hf.llava_model(projector, image_size=42)
        d = str(tmp_path_factory.mktemp("llava"))
        hf.save_pretrained(d)
        config, params = load_hf(d)
        assert config.projector_type == projector
        out[projector] = (hf, config, params)
    return out


@pytest.fixture(params=["mlp2x_gelu", "linear"])
def llava_pair(request, llava_models):
    return llava_models[request.param]


@pytest.mark.slow
@pytest.mark.parametrize("projector,cpu_shapes", [("mlp2x_gelu", False), ("linear", False), ("linear", True)])
def test_llava_matches_hf_with_mixed_image_batch(llava_models, projector, cpu_shapes):
    hf, config, params = llava_models[projector]
    config = config.with_runtime(cpu_shapes=cpu_shapes)  # both towers and the projector
    ids, mask, pixels, has_image = _llava_batch(config)
    ours = np.asarray(Llava(config).apply({"params": params}, ids, pixels, mask))
    ref = _hf_llava_logits(hf, ids, mask, pixels, has_image)
    assert ours.shape == ref.shape == (*ids.shape, tiny_hf.VOCAB)
    assert tiny_hf.rel_error(ours, ref, mask) <= 1e-4
    # The image really matters: other pixels change the image items' logits only.
    other = np.asarray(Llava(config).apply({"params": params}, ids, pixels + 1.0, mask))
    assert np.abs(other[0] - ours[0]).max() > 1e-3
    np.testing.assert_array_equal(other[2], ours[2])


def test_text_only_call_without_pixels(llava_pair):
    hf, config, params = llava_pair
    ids, mask, pixels, _ = _llava_batch(config, pads=(2,), image=(False,))
    with_pixels = np.asarray(Llava(config).apply({"params": params}, ids, pixels, mask))
    without = np.asarray(Llava(config).apply({"params": params}, ids, None, mask))
    np.testing.assert_array_equal(with_pixels, without)


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(llava_pair):
    _, config, params = llava_pair
    ids, mask, pixels, _ = _llava_batch(config)
    f32 = np.asarray(Llava(config).apply({"params": params}, ids, pixels, mask))
    bf16_config = config.with_runtime(dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    bf16 = Llava(bf16_config).apply({"params": bf16_params}, ids, pixels, mask)
    assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    assert tiny_hf.rel_error(np.asarray(bf16), f32, mask) <= 2e-2


@pytest.mark.slow
def test_remat_policies_do_not_change_gradients(llava_models):
    _, config, params = llava_models["mlp2x_gelu"]
    ids, mask, pixels, _ = _llava_batch(config)

    def loss(p, cfg):
        return jnp.mean(Llava(cfg).apply({"params": p}, ids, pixels, mask) ** 2)

    base = jax.jit(jax.grad(loss), static_argnums=1)(params, config)
    for policy in ("full", "dots"):
        remat = jax.jit(jax.grad(loss), static_argnums=1)(params, config.with_runtime(remat_policy=policy))
        for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(remat)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_every_param_has_logical_axes(llava_pair):
    _, config, params = llava_pair
    axes = logical_axes(config)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))[0])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    assert flat_axes.keys() == flat_params.keys()
    for path, spec in flat_axes.items():
        assert len(spec) == np.ndim(flat_params[path]), path
    assert flat_axes[next(p for p in flat_axes if "q_proj" in str(p) and "llm" in str(p))] == \
        jax.sharding.PartitionSpec("layers", "embed", "heads")
