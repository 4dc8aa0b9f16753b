"""HF PyTorch <-> llava_jax conversion: round trips, the three import layouts, dtypes and
the `tools/convert_hf.py` command line. Bad input: test_convert_errors.py."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_helpers  # noqa: F401  (fixtures)
from convert_helpers import *  # noqa: F401,F403  (helpers and module-scoped fixtures)

# ----------------------------------------------------------------------------- 1. llava-hf round trip

def test_llava_hf_round_trip_is_bit_exact(llava_hf, root, capsys):
    projector, model, src = llava_hf
    ckpt, export = str(root / f"rt_ckpt_{projector}"), str(root / f"rt_export_{projector}")
    out = run_ok(["import", "--hf", src, "--out", ckpt], capsys)
    assert f"projector={projector}" in out
    out = run_ok(["export", "--ckpt", ckpt, "--out", export], capsys)
    assert "LlavaForConditionalGeneration" in out
    assert not glob.glob(glob.escape(export) + ".partial-*")

    config, params = load_checkpoint(ckpt)
    assert config.projector_type == projector
    assert ("linear_2" in params["projector"]) == (projector == "mlp2x_gelu")

    back = assert_hf_loads_clean(export)
    ref_sd, got_sd = model.state_dict(), back.state_dict()
    assert sorted(got_sd) == sorted(ref_sd)
    for key, ref in ref_sd.items():
        assert got_sd[key].dtype == ref.dtype and torch.equal(got_sd[key], ref), key

    a, b = model.config, back.config
    for field in TEXT_FIELDS:
        assert getattr(b.text_config, field) == getattr(a.text_config, field), field
    for field in VISION_FIELDS:
        assert getattr(b.vision_config, field) == getattr(a.vision_config, field), field
    for field in ("image_token_index", "projector_hidden_act", "vision_feature_layer",
                  "vision_feature_select_strategy", "multimodal_projector_bias"):
        assert getattr(b, field) == getattr(a, field), field
    assert b.architectures == ["LlavaForConditionalGeneration"]

    # The export imports again to the same model (a `linear` projector stays one Linear).
    config2, params2 = load_hf(export)
    assert config2.projector_type == projector
    if projector == "linear":
        assert "linear_2" not in params2["projector"]
    assert_trees_equal(params2, jax.tree_util.tree_map(np.asarray, params))


def test_llava_hf_import_matches_hf_logits(llava_hf_mlp):
    model, src = llava_hf_mlp
    config, params = load_hf(src)
    sd = model.state_dict()
    np.testing.assert_array_equal(params["llm"]["layers"]["attn"]["k_proj"]["kernel"][1],
                                  np_(sd["model.language_model.layers.1.self_attn.k_proj.weight"]).T)
    ids, mask, pos, px = image_batch(config)
    ours, ref = our_logits(config, params, ids, mask, pos, px), hf_logits(model, ids, mask, pos, px)
    assert ours.shape == ref.shape
    assert tiny_hf.rel_error(ours, ref, mask) <= 1e-4


def _saved_names(directory: str) -> set[str]:
    """Tensor names over every safetensors file of a directory, read with safetensors itself."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        with safe_open(path, "np") as f:
            names.update(f.keys())
    return names


def test_export_writes_the_names_transformers_saves(llava_hf, root):
    """Our export names every tensor as the installed transformers' save_pretrained does for
    the same model (one shard or several), and transformers loads it with no key left over."""
    projector, _, src = llava_hf  # src: written by LlavaForConditionalGeneration.save_pretrained
    config, params = load_hf(src)
    for shard_bytes in (5 * 2**30, 20_000):
        out = str(root / f"names_export_{projector}_{shard_bytes}")
        export_hf(config, params, out, max_shard_bytes=shard_bytes)
        assert _saved_names(out) == _saved_names(src)
        assert_hf_loads_clean(out)
    assert any(n.startswith("vision_tower.embeddings.") for n in _saved_names(src))


def test_transformers_4_vision_names_still_import(llava_hf, root):
    """Published llava-hf checkpoints nest the CLIP tower under `vision_tower.vision_model.`."""
    projector, _, src = llava_hf

    def nest(tensors):
        for name in [n for n in tensors if n.startswith("vision_tower.")]:
            tensors["vision_tower.vision_model." + name[len("vision_tower."):]] = tensors.pop(name)

    legacy = copy_hf_dir(src, str(root / f"legacy_names_{projector}"), edit=nest)
    assert any(n.startswith("vision_tower.vision_model.encoder.") for n in _saved_names(legacy))
    assert_trees_equal(load_hf(legacy)[1], load_hf(src)[1])


# ----------------------------------------------------------------------------- 2. original LLaVA layout

@pytest.mark.slow
def test_original_layout_import_verify_export(original, clip, root, capsys):
    projector, tensors, src = original
    clip_model, clip_dir = clip
    ckpt, export = str(root / f"orig_ckpt_{projector}"), str(root / f"orig_export_{projector}")
    run_ok(["import", "--hf", src, "--vision-tower", clip_dir, "--out", ckpt], capsys)
    config, params = load_checkpoint(ckpt)
    assert config.projector_type == projector
    assert config.text.vocab_size == tiny_hf.VOCAB and config.image_token_index == tiny_hf.VOCAB
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"

    # Parameters are the source tensors (Linear weights transposed, conv OIHW -> HWIO).
    proj = params["projector"]
    if projector == "linear":
        assert set(proj) == {"linear_1"}
        np.testing.assert_array_equal(proj["linear_1"]["kernel"], np_(tensors["model.mm_projector.weight"]).T)
        np.testing.assert_array_equal(proj["linear_1"]["bias"], np_(tensors["model.mm_projector.bias"]))
    else:
        assert set(proj) == {"linear_1", "linear_2"}
        for ours, theirs in (("linear_1", "0"), ("linear_2", "2")):
            np.testing.assert_array_equal(proj[ours]["kernel"], np_(tensors[f"model.mm_projector.{theirs}.weight"]).T)
            np.testing.assert_array_equal(proj[ours]["bias"], np_(tensors[f"model.mm_projector.{theirs}.bias"]))
    llm = params["llm"]
    np.testing.assert_array_equal(llm["layers"]["attn"]["q_proj"]["kernel"][1],
                                  np_(tensors["model.layers.1.self_attn.q_proj.weight"]).T)
    np.testing.assert_array_equal(llm["layers"]["attn"]["v_proj"]["kernel"][0],
                                  np_(tensors["model.layers.0.self_attn.v_proj.weight"]).T)
    np.testing.assert_array_equal(llm["embed_tokens"]["embedding"], np_(tensors["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(llm["lm_head"]["kernel"], np_(tensors["lm_head.weight"]).T)
    csd = clip_model.state_dict()
    vision = params["vision"]
    np.testing.assert_array_equal(vision["layers"]["mlp"]["fc1"]["kernel"][2],
                                  np_(csd["encoder.layers.2.mlp.fc1.weight"]).T)
    np.testing.assert_array_equal(vision["layers"]["attn"]["o_proj"]["bias"][1],
                                  np_(csd["encoder.layers.1.self_attn.out_proj.bias"]))
    np.testing.assert_array_equal(vision["patch_embed"]["kernel"],
                                  np_(csd["embeddings.patch_embedding.weight"]).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(vision["pre_norm"]["scale"], np_(csd["pre_layrnorm.weight"]))

    result = verify(src, config, params, vision_dir=clip_dir)
    assert result.compared_tokens > 0 and result.max_abs_logit > 0
    assert result.rel_error <= 1e-4

    # Export: HF loads it cleanly and computes the same logits over the original vocabulary.
    run_ok(["export", "--ckpt", ckpt, "--out", export], capsys)
    hf = assert_hf_loads_clean(export)
    assert hf.config.image_token_index == tiny_hf.VOCAB
    assert hf.config.text_config.vocab_size > tiny_hf.VOCAB
    assert hf.config.projector_hidden_act == ("linear" if projector == "linear" else "gelu")
    ids, mask, pos, px = image_batch(config)
    ours = our_logits(config, params, ids, mask, pos, px)
    ref = hf_logits(hf, ids, mask, pos, px)
    assert ours.shape[-1] == tiny_hf.VOCAB and ref.shape[-1] == hf.config.text_config.vocab_size
    assert tiny_hf.rel_error(ours, ref[..., :tiny_hf.VOCAB], mask) <= 1e-4
    # and it imports back to the same params (the vocabulary padding aside).
    config2, params2 = load_hf(export)
    assert config2.projector_type == projector
    np.testing.assert_array_equal(params2["llm"]["embed_tokens"]["embedding"][:tiny_hf.VOCAB],
                                  llm["embed_tokens"]["embedding"])
    assert_trees_equal(params2["vision"], jax.tree_util.tree_map(np.asarray, vision))
    assert_trees_equal(params2["projector"], jax.tree_util.tree_map(np.asarray, proj))


def test_original_layout_vision_tower_from_config(clip, root, capsys):
    _, clip_dir = clip
    src = str(root / "original_cfg_tower")
    tiny_hf.save_original_llava(src, "linear", vision_tower=clip_dir)
    ckpt = str(root / "original_cfg_tower_ckpt")
    run_ok(["import", "--hf", src, "--out", ckpt], capsys)  # no --vision-tower
    config, params = load_checkpoint(ckpt)
    ref_config, ref_params = load_hf(src, vision_tower=clip_dir)
    assert config.projector_type == "linear" == ref_config.projector_type
    assert_trees_equal(params, ref_params)


# ----------------------------------------------------------------------------- 3. plain LLaMA + CLIP

def test_plain_llama_gets_fresh_projector(llama, clip):
    llm_model, src = llama
    clip_model, clip_dir = clip
    config, params = load_hf(src, vision_tower=clip_dir)
    assert config.projector_type == "linear"
    assert config.image_token_index == config.text.vocab_size == tiny_hf.VOCAB
    proj = params["projector"]
    assert set(proj) == {"linear_1"}
    assert proj["linear_1"]["kernel"].shape == (32, 32) and proj["linear_1"]["bias"].shape == (32,)
    assert np.all(np.isfinite(proj["linear_1"]["kernel"])) and np.any(proj["linear_1"]["kernel"])

    sd = llm_model.state_dict()
    for i in range(2):
        np.testing.assert_array_equal(params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"][i],
                                      np_(sd[f"model.layers.{i}.mlp.gate_proj.weight"]).T)
    np.testing.assert_array_equal(params["llm"]["layers"]["input_norm"]["scale"][1],
                                  np_(sd["model.layers.1.input_layernorm.weight"]))
    np.testing.assert_array_equal(params["llm"]["lm_head"]["kernel"], np_(sd["lm_head.weight"]).T)
    csd = clip_model.state_dict()
    np.testing.assert_array_equal(params["vision"]["layers"]["attn"]["k_proj"]["kernel"][0],
                                  np_(csd["encoder.layers.0.self_attn.k_proj.weight"]).T)
    np.testing.assert_array_equal(params["vision"]["pos_embed"], np_(csd["embeddings.position_embedding.weight"]))

    np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"], np_(sd["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(params["llm"]["norm"]["scale"], np_(sd["model.norm.weight"]))
    _, same = load_hf(src, vision_tower=clip_dir, seed=0)
    assert_trees_equal(same["projector"], proj)
    _, other = load_hf(src, vision_tower=clip_dir, seed=1)
    assert not np.array_equal(other["projector"]["linear_1"]["kernel"], proj["linear_1"]["kernel"])
    assert_trees_equal(other["llm"], params["llm"])
    assert_trees_equal(other["vision"], params["vision"])


# ----------------------------------------------------------------------------- 4. bfloat16

def test_bfloat16_import_and_checkpoint_round_trip(llava_hf_mlp, root, capsys):
    model, src = llava_hf_mlp
    config, params = load_hf(src, dtype=jnp.bfloat16)
    assert config.text.param_dtype == "bfloat16" and config.vision.param_dtype == "bfloat16"
    assert {x.dtype for x in leaves(params).values()} == {BF16}
    q = model.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["llm"]["layers"]["attn"]["q_proj"]["kernel"][0].astype(np.float32),
                                  np_(q.bfloat16()).T)

    path = str(root / "bf16_ckpt")
    save_checkpoint(path, config, params)
    loaded_config, loaded = load_checkpoint(path)
    assert loaded_config.text.param_dtype == "bfloat16"
    assert_trees_equal(loaded, params)  # same dtype (bf16) and values

    f32_config, f32 = load_checkpoint(path, dtype=jnp.float32)
    assert f32_config.text.param_dtype == "float32"
    assert {x.dtype for x in leaves(f32).values()} == {np.dtype(np.float32)}
    assert_trees_equal(f32, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))

    # A bfloat16 export is the source rounded to bfloat16, tensor for tensor.
    export = str(root / "bf16_export")
    export_hf(loaded_config, loaded, export)
    hf = assert_hf_loads_clean(export)
    ref_sd, got_sd = model.state_dict(), hf.state_dict()
    assert sorted(got_sd) == sorted(ref_sd)
    for key, ref in ref_sd.items():
        assert got_sd[key].dtype == torch.bfloat16 and torch.equal(got_sd[key], ref.bfloat16()), key

    # The command line stores bfloat16 too.
    cli_path = str(root / "bf16_cli_ckpt")
    out = run_ok(["import", "--hf", src, "--out", cli_path, "--dtype", "bfloat16"], capsys)
    assert "dtype=bfloat16" in out
    _, cli_params = load_checkpoint(cli_path)
    assert_trees_equal(cli_params, params)


# ----------------------------------------------------------------------------- 5. verify command

def test_verify_command_prints_error(llava_hf_mlp, llava_hf_mlp_ckpt, capsys):
    out = run_ok(["verify", "--hf", llava_hf_mlp[1], "--ckpt", llava_hf_mlp_ckpt], capsys)
    m = re.search(r"relative error ([0-9.eE+-]+)", out)
    assert m, out
    assert 0 <= float(m.group(1)) <= 1e-5
    assert re.search(r"compared (\d+) tokens", out) and int(re.search(r"compared (\d+) tokens", out).group(1)) > 0


@pytest.mark.slow
def test_command_line_subprocess(llava_hf_mlp, root):
    """The real command line: an import, then an export onto an existing directory, which must
    end with exactly one `error:` line on stderr (no warnings or tracebacks) and status 2."""
    script = os.path.join(REPO, "tools", "convert_hf.py")
    out = str(root / "subprocess_ckpt")
    proc = subprocess.run([sys.executable, script, "import", "--hf", llava_hf_mlp[1], "--out", out],
                          capture_output=True, text=True, timeout=120, cwd=str(root))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "projector=mlp2x_gelu" in proc.stdout
    config, params = load_checkpoint(out)
    assert config.projector_type == "mlp2x_gelu"
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, params), load_hf(llava_hf_mlp[1])[1])

    before = sorted(os.listdir(llava_hf_mlp[1]))
    proc = subprocess.run([sys.executable, script, "export", "--ckpt", out, "--out", llava_hf_mlp[1]],
                          capture_output=True, text=True, timeout=120, cwd=str(root))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert sorted(os.listdir(llava_hf_mlp[1])) == before
    assert not glob.glob(glob.escape(llava_hf_mlp[1]) + ".partial-*")
