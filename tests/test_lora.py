"""LoRA adapters, heads, trainable splits, merge and PEFT interop on tiny float32 models."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tiny_hf
from llava_jax.models import heads, lora
from llava_jax.models import trainable
from llava_jax.convert import ConversionError, load_hf
from llava_jax.convert.peft import read_peft_adapter
from tools.convert_hf import main as convert_main

PEFT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _batch(config, pads=(0, 3), seed=0):
    n = config.num_image_tokens
    seq = 1 + n + 6 + max(pads)
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, tiny_hf.IMAGE_TOKEN, size=(len(pads), seq))
    mask = np.ones_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
        ids[b, pad + 1:pad + 1 + n] = config.image_token_index
    pixels = rng.randn(len(pads), config.vision.image_size, config.vision.image_size, 3).astype(np.float32)
    return ids, mask, pixels


def _randomise_lora(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llava-hf model, its import, and a PEFT adapter with random A and B."""
    root = tmp_path_factory.mktemp("lora")
    hf = tiny_hf.llava_model("mlp2x_gelu")
    hf.save_pretrained(root / "hf")
    config, base = load_hf(str(root / "hf"))
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                               target_modules=PEFT_TARGETS + r"|.*multi_modal_projector\.linear_1")
    peft_model = peft.get_peft_model(tiny_hf.llava_model("mlp2x_gelu"), peft_cfg).eval()
    _randomise_lora(peft_model)
    peft_model.save_pretrained(root / "peft")
    return {"root": root, "hf": hf, "config": config, "base": base, "peft_model": peft_model}


@pytest.mark.slow
def test_fresh_adapter_and_no_adapter_equal_the_base(world):
    config, base = world["config"], world["base"]
    ids, mask, pixels = _batch(config)
    plain = lora.forward(config, base, None, ids, pixels, mask)
    from llava_jax.models.llava import Llava
    np.testing.assert_array_equal(plain, Llava(config).apply({"params": base}, ids, pixels, mask))
    fresh = lora.init_adapter(base, lora.LoraConfig(rank=8, alpha=16), jax.random.PRNGKey(0))
    assert np.abs(np.asarray(fresh.params["llm"]["layers"]["attn"]["q_proj"]["a"])).max() > 0
    np.testing.assert_array_equal(lora.forward(config, base, fresh, ids, pixels, mask), plain)


def test_lora_forward_matches_hf_peft(world):
    config, base = world["config"], world["base"]
    adapter = read_peft_adapter(str(world["root"] / "peft"), base)
    assert adapter.config.rank == 4 and adapter.config.scale == 2.0 and adapter.config.projector == ("linear_1",)
    assert adapter.config.targets == lora.LLM_TARGETS
    ids, mask, pixels = _batch(config)
    ours = np.asarray(lora.forward(config, base, adapter, ids, pixels, mask))
    pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    with torch.no_grad():
        ref = world["peft_model"](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos,
                                  pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits.numpy()
    base_logits = np.asarray(lora.forward(config, base, None, ids, pixels, mask))
    assert tiny_hf.rel_error(base_logits, ref, mask) > 1e-2  # the adapter really changes the logits
    assert tiny_hf.rel_error(ours, ref, mask) <= 1e-5


def test_merge_equals_adapter_forward(world):
    config, base = world["config"], world["base"]
    adapter = read_peft_adapter(str(world["root"] / "peft"), base)
    ids, mask, pixels = _batch(config)
    merged = lora.merge(base, adapter)
    assert tiny_hf.rel_error(np.asarray(lora.forward(config, merged, None, ids, pixels, mask)),
                             np.asarray(lora.forward(config, base, adapter, ids, pixels, mask)), mask) <= 1e-5
    # merge leaves the base untouched
    assert not np.array_equal(merged["llm"]["layers"]["attn"]["q_proj"]["kernel"],
                              base["llm"]["layers"]["attn"]["q_proj"]["kernel"])


def test_peft_round_trip_is_bit_identical_and_merged_export_loads(world, tmp_path, capsys):
    root = world["root"]
    ckpt, out, merged = tmp_path / "ckpt", tmp_path / "peft_out", tmp_path / "merged"
    convert_main(["import", "--hf", str(root / "hf"), "--out", str(ckpt)])
    convert_main(["import-adapter", "--peft", str(root / "peft"), "--ckpt", str(ckpt), "--name", "policy"])
    convert_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "peft", "--adapter", "policy"])
    src, dst = load_file(root / "peft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(src) == sorted(dst)
    for key in src:
        assert torch.equal(src[key], dst[key]), key
    # PEFT loads our export onto HF llava with no missing keys and the same logits.
    loaded = peft.PeftModel.from_pretrained(tiny_hf.llava_model("mlp2x_gelu"), str(out)).eval()
    config, base = world["config"], world["base"]
    ids, mask, pixels = _batch(config)
    pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos,
                  pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
    with torch.no_grad():
        ref = world["peft_model"](**kwargs).logits.numpy()
        np.testing.assert_array_equal(loaded(**kwargs).logits.numpy(), ref)
    # Merged export: a full llava-hf model whose logits are the adapter forward's.
    convert_main(["export", "--ckpt", str(ckpt), "--out", str(merged), "--format", "merged", "--adapter", "policy"])
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        merged_logits = model.eval()(**kwargs).logits.numpy()
    assert tiny_hf.rel_error(merged_logits, ref, mask) <= 1e-5
    assert "merged" in capsys.readouterr().out


def test_original_llava_adapter_layout_and_reward_head(world, tmp_path):
    """LLaVA-RLHF layout: base_model.model.model.layers.N..., adapter_model/lora_default/, reward_head file."""
    src = load_file(world["root"] / "peft" / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.model.layers.".rsplit("layers.", 1)[0])
               .replace("base_model.model.model.multi_modal_projector.linear_1", "base_model.model.model.mm_projector"): v
               for k, v in src.items()}
    assert any(k.startswith("base_model.model.model.layers.0.") for k in renamed)
    nested = tmp_path / "rm" / "adapter_model" / "lora_default"
    nested.mkdir(parents=True)
    save_file(renamed, nested / "adapter_model.safetensors")
    cfg = json.loads((world["root"] / "peft" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "mm_projector"]
    (nested / "adapter_config.json").write_text(json.dumps(cfg))
    head = {"weight": torch.randn(1, 32), "bias": torch.randn(1)}
    torch.save(head, tmp_path / "rm" / "reward_head")
    ours = read_peft_adapter(str(tmp_path / "rm"), world["base"])
    reference = read_peft_adapter(str(world["root"] / "peft"), world["base"])
    for a, b in zip(jax.tree_util.tree_leaves(ours.params), jax.tree_util.tree_leaves(reference.params)):
        np.testing.assert_array_equal(a, b)
    from llava_jax.convert.peft import read_head
    loaded, kind = read_head(str(tmp_path / "rm"), 32)
    assert kind == "reward"
    np.testing.assert_array_equal(loaded["kernel"][:, 0], head["weight"][0].numpy())


def test_adapter_mismatches_are_clear_errors(world, tmp_path):
    src_dir = world["root"] / "peft"
    cfg = json.loads((src_dir / "adapter_config.json").read_text())
    tensors = load_file(src_dir / "adapter_model.safetensors")

    def write(name, config, data):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config))
        save_file(data, d / "adapter_model.safetensors")
        return str(d)

    with pytest.raises(ConversionError, match="rank 4, adapter_config.json says r=8"):
        read_peft_adapter(write("rank", {**cfg, "r": 8}, tensors), world["base"])
    with pytest.raises(ConversionError, match=r"target modules \['fc1'\] are not LoRA-adaptable"):
        read_peft_adapter(write("target", {**cfg, "target_modules": ["q_proj", "fc1"]}, tensors), world["base"])
    key = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"
    bad = {**tensors, key: torch.zeros(4, 31)}
    with pytest.raises(ConversionError, match=r"shape mismatch for .*layers\.1\.self_attn\.q_proj\.lora_A\.weight: "
                       r"expected \(4, 32\) for the base layer, found \(4, 31\)"):
        read_peft_adapter(write("shape", cfg, bad), world["base"])


def test_train_step_updates_only_adapter_and_head(world):
    """Optimiser state exists only for trainable leaves; the bfloat16 base gets no gradient."""
    config, base = world["config"], world["base"]
    base16 = trainable.cast_tree(base, jnp.bfloat16)
    run_cfg = config.with_runtime(dtype="float32")
    adapter = lora.init_adapter(base16, lora.LoraConfig(rank=4, alpha=8, targets=("q", "v")), jax.random.PRNGKey(1))
    train = {"adapter": adapter.params, "head": heads.init_head("reward", 32, jax.random.PRNGKey(2))}
    opt = optax.adamw(1e-2)
    opt_state = opt.init(train)
    ids, mask, pixels = _batch(config)

    def loss_fn(train, frozen):
        ad = lora.Adapter(train["adapter"], adapter.config)
        hidden = lora.forward(run_cfg, frozen, ad, ids, pixels, mask, method="hidden")
        return jnp.mean(heads.reward_scores(train["head"], hidden, mask) ** 2)

    @jax.jit
    def step(train, opt_state, frozen):
        grads = jax.grad(loss_fn)(train, frozen)
        updates, opt_state = opt.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state

    new_train, new_state = step(train, opt_state, base16)
    train_paths = trainable.leaf_paths(train)
    assert sorted(train_paths) == sorted(
        [f"adapter/llm/layers/attn/{m}/{k}" for m in ("q_proj", "v_proj") for k in ("a", "b")]
        + ["head/bias", "head/kernel"])
    moments = [p.split("/", 1)[1] for p in trainable.leaf_paths(new_state) if not p.endswith("count")]
    assert sorted(moments) == sorted([f"{m}/{p}" for m in ("mu", "nu") for p in train_paths])
    b = new_train["adapter"]["llm"]["layers"]["attn"]["v_proj"]["b"]
    assert b.dtype == jnp.float32 and np.abs(np.asarray(b)).max() > 0  # the adapter trained
    assert base16["llm"]["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16


def test_split_and_join_base(world):
    base = world["base"]
    train, frozen = trainable.split_base(base, ["projector", "llm/norm"])
    assert set(train) == {"projector", "llm"} and set(train["llm"]) == {"norm"}
    assert "projector" not in frozen and "norm" not in frozen["llm"] and "layers" in frozen["llm"]
    joined = trainable.join_base(train, frozen)
    assert trainable.leaf_paths(joined) == trainable.leaf_paths(base)
    with pytest.raises(ValueError, match="'llm/nope' is not in the base params"):
        trainable.split_base(base, ["llm/nope"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_head_reads_last_non_pad_token(side):
    hidden = jnp.asarray(np.random.RandomState(0).randn(2, 6, 4), jnp.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]) if side == "right" else \
        np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    head = heads.init_head("reward", 4, jax.random.PRNGKey(0))
    assert float(head["bias"][0]) == 0.0
    scores = heads.reward_scores(head, hidden, jnp.asarray(mask))
    last = [3, 5] if side == "right" else [5, 5]
    expected = [float(np.asarray(hidden)[b, last[b]] @ np.asarray(head["kernel"])[:, 0]) for b in range(2)]
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-6)
    value = heads.init_head("value", 4)
    assert not np.any(np.asarray(heads.token_values(value, hidden)))


def test_four_roles_share_one_base(world):
    """policy, ref_policy (= base), value and reward run in one jitted call over one base."""
    config, base = world["config"], world["base"]
    policy = read_peft_adapter(str(world["root"] / "peft"), base)
    critic = lora.init_adapter(base, lora.LoraConfig(rank=2, alpha=4), jax.random.PRNGKey(3))
    value_head = heads.init_head("value", 32)
    reward_head = heads.init_head("reward", 32, jax.random.PRNGKey(4))
    ids, mask, pixels = _batch(config)

    @jax.jit
    def roles(base, policy, critic, value_head, reward_head):
        feats = lora.forward(config, base, None, pixels, method="vision_features")  # once, shared
        kw = dict(vision_features=feats)
        pol = lora.forward(config, base, policy, ids, None, mask, **kw)
        ref = lora.forward(config, base, None, ids, None, mask, **kw)
        val = heads.token_values(value_head, lora.forward(config, base, critic, ids, None, mask, method="hidden", **kw))
        rew = heads.reward_scores(reward_head, lora.forward(config, base, critic, ids, None, mask, method="hidden",
                                                              **kw), mask)
        return pol, ref, val, rew

    pol, ref, val, rew = roles(base, policy, critic, value_head, reward_head)
    np.testing.assert_allclose(ref, lora.forward(config, base, None, ids, pixels, mask), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pol, lora.forward(config, base, policy, ids, pixels, mask), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(pol - ref)).max() > 1e-3
    assert not np.any(np.asarray(val)) and rew.shape == (2,) and np.all(np.isfinite(np.asarray(rew)))
