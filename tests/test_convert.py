"""HF PyTorch <-> llava_jax conversion: round trips, the three import layouts, dtypes,
the `tools/convert_hf.py` command line and its errors for bad input.

Every HF model here is tiny and random (tests/tiny_hf.py) and is built once per module.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPO, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "tests"))
import tiny_hf  # noqa: E402

from llava_jax.convert import ConversionError, export_hf, load_checkpoint, load_hf, save_checkpoint  # noqa: E402
from llava_jax.convert.verify import verify  # noqa: E402
from llava_jax.models.llava import Llava  # noqa: E402

_spec = importlib.util.spec_from_file_location("convert_hf_cli", os.path.join(REPO, "tools", "convert_hf.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

BF16 = np.dtype(ml_dtypes.bfloat16)
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
               "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
               "attention_bias", "mlp_bias")
VISION_FIELDS = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "layer_norm_eps", "hidden_act", "projection_dim")


# ----------------------------------------------------------------------------- helpers

def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        assert la[k].dtype == lb[k].dtype, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def run_ok(argv: list[str], capsys) -> str:
    """Runs the CLI in-process; it must return normally. Returns stdout."""
    cli.main(argv)
    out, err = capsys.readouterr()
    assert "error:" not in err
    return out


def run_error(argv: list[str], capsys, out_path: str | None, *fragments: str) -> str:
    """Runs the CLI in-process expecting bad input: exit 2, one `error:` line naming the fragments,
    nothing on stdout and no output (nor a partial sibling of it) left behind."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (exc.value.code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert out == ""
    if out_path is not None:
        assert not os.path.lexists(out_path)
        assert not glob.glob(glob.escape(out_path) + ".partial-*")
    return lines[0]


def assert_hf_loads_clean(directory: str) -> transformers.LlavaForConditionalGeneration:
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    return model.eval()


def image_batch(config, pads=(0, 3), text_len=6, seed=0):
    """Two items, both with an image, the second left padded; positions = cumsum(mask)-1 >= 0."""
    n = config.num_image_tokens
    seq = max(pads) + 1 + n + text_len
    ids, mask = tiny_hf.left_padded_batch(seq, list(pads), seed=seed)
    for b, pad in enumerate(pads):
        ids[b, pad + 1:pad + 1 + n] = config.image_token_index
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    size = config.vision.image_size
    pixels = np.random.RandomState(seed + 1).randn(len(pads), size, size, 3).astype(np.float32)
    return ids, mask, positions, pixels


def our_logits(config, params, ids, mask, positions, pixels) -> np.ndarray:
    fn = jax.jit(lambda p, i, px, m, pos: Llava(config).apply({"params": p}, i, px, m, positions=pos))
    out = fn(params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask), jnp.asarray(positions))
    assert out.dtype == jnp.float32
    return np.asarray(out)


def hf_logits(model, ids, mask, positions, pixels) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                     attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits.numpy()


def copy_hf_dir(src: str, dst: str, edit=None) -> str:
    """Copies an HF directory with one model.safetensors, applying `edit(tensors)` to its tensors."""
    shutil.copytree(src, dst)
    if edit is not None:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return dst


def edit_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def clip(root):
    directory = str(root / "clip")
    return tiny_hf.save_clip(directory), directory


@pytest.fixture(scope="module", params=["mlp2x_gelu", "linear"])
def llava_hf(request, root):
    model = tiny_hf.llava_model(request.param)
    directory = str(root / f"llava_hf_{request.param}")
    model.save_pretrained(directory)
    return request.param, model, directory


@pytest.fixture(scope="module")
def llava_hf_mlp(root):
    model = tiny_hf.llava_model("mlp2x_gelu", seed=3)
    directory = str(root / "llava_hf_mlp_src")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def llava_hf_mlp_ckpt(llava_hf_mlp, root):
    config, params = load_hf(llava_hf_mlp[1])
    path = str(root / "llava_hf_mlp_ckpt")
    save_checkpoint(path, config, params)
    return path


@pytest.fixture(scope="module", params=["linear", "mlp2x_gelu"])
def original(request, root, clip):
    directory = str(root / f"original_{request.param}")
    tensors = tiny_hf.save_original_llava(directory, request.param)
    return request.param, tensors, directory


@pytest.fixture(scope="module")
def llama(root):
    directory = str(root / "llama")
    return tiny_hf.save_llama(directory), directory


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


# ----------------------------------------------------------------------------- 2. original LLaVA layout

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


# ----------------------------------------------------------------------------- 6. bad input

def test_error_missing_hf_dir(root, capsys):
    out = str(root / "err_missing_dir_out")
    run_error(["import", "--hf", str(root / "does_not_exist"), "--out", out], capsys, out,
              "does_not_exist", "does not exist")


def test_error_no_config_json(llava_hf_mlp, root, capsys):
    src = copy_hf_dir(llava_hf_mlp[1], str(root / "err_no_config"))
    os.remove(os.path.join(src, "config.json"))
    out = str(root / "err_no_config_out")
    run_error(["import", "--hf", src, "--out", out], capsys, out, "missing", os.path.join(src, "config.json"))


def test_error_no_weights(llava_hf_mlp, root, capsys):
    src = copy_hf_dir(llava_hf_mlp[1], str(root / "err_no_weights"))
    os.remove(os.path.join(src, "model.safetensors"))
    out = str(root / "err_no_weights_out")
    run_error(["import", "--hf", src, "--out", out], capsys, out, "no weights found", src)


def test_error_unknown_key(llava_hf_mlp, root, capsys):
    extra = "language_model.model.layers.0.self_attn.extra.weight"
    src = copy_hf_dir(llava_hf_mlp[1], str(root / "err_unknown"),
                      lambda t: t.__setitem__(extra, torch.zeros(4, 4)))
    out = str(root / "err_unknown_out")
    line = run_error(["import", "--hf", src, "--out", out], capsys, out, "unknown key", extra)
    assert "q_proj" not in line
    with pytest.raises(ConversionError, match=re.escape(extra)):
        load_hf(src)


def test_error_missing_key(llava_hf_mlp, root, capsys):
    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    src = copy_hf_dir(llava_hf_mlp[1], str(root / "err_missing_key"), lambda t: t.pop(gone))
    out = str(root / "err_missing_key_out")
    line = run_error(["import", "--hf", src, "--out", out], capsys, out, "missing key", gone)
    assert "layers.0" not in line and "gate_proj" not in line


def test_error_shape_mismatch(llava_hf_mlp, root, capsys):
    key = "language_model.model.layers.1.mlp.up_proj.weight"  # [64, 32] in HF layout
    src = copy_hf_dir(llava_hf_mlp[1], str(root / "err_shape"),
                      lambda t: t.__setitem__(key, torch.zeros(64, 31)))
    out = str(root / "err_shape_out")
    run_error(["import", "--hf", src, "--out", out], capsys, out,
              "shape mismatch", key, "expected (64, 32)", "found (64, 31)")


def test_error_unsupported_architecture(llama, root, capsys):
    src = copy_hf_dir(llama[1], str(root / "err_mistral"))
    edit_json(os.path.join(src, "config.json"), architectures=["MistralForCausalLM"], model_type="mistral")
    out = str(root / "err_mistral_out")
    run_error(["import", "--hf", src, "--out", out], capsys, out, "unsupported architecture", "MistralForCausalLM")


def test_error_original_layout_needs_vision_tower(root, capsys):
    src = str(root / "err_orig_no_tower")
    tiny_hf.save_original_llava(src, "linear", vision_tower="openai/clip-vit-large-patch14")
    out = str(root / "err_orig_no_tower_out")
    run_error(["import", "--hf", src, "--out", out], capsys, out,
              "--vision-tower", "openai/clip-vit-large-patch14")


def test_error_corrupt_safetensors(llava_hf_mlp, root, capsys):
    src = copy_hf_dir(llava_hf_mlp[1], str(root / "err_corrupt"))
    weights = os.path.join(src, "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    out = str(root / "err_corrupt_out")
    run_error(["import", "--hf", src, "--out", out], capsys, out, weights, "truncated")


def test_error_export_to_existing_dir(llava_hf_mlp_ckpt, root, capsys):
    out = root / "err_existing_out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_error(["export", "--ckpt", llava_hf_mlp_ckpt, "--out", str(out)], capsys, None, "already exists", str(out))
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not glob.glob(glob.escape(str(out)) + ".partial-*")
    # With --overwrite it is replaced by the export.
    run_ok(["export", "--ckpt", llava_hf_mlp_ckpt, "--out", str(out), "--overwrite"], capsys)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not glob.glob(glob.escape(str(out)) + ".partial-*") and not glob.glob(glob.escape(str(out)) + ".old-*")


def test_error_checkpoint_config_mismatch(llava_hf_mlp_ckpt, root, capsys):
    ckpt = str(root / "err_bad_ckpt")
    shutil.copytree(llava_hf_mlp_ckpt, ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        meta = json.load(f)
    meta["llava"]["text"]["num_layers"] = 3
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ConversionError, match="llm/layers/attn/q_proj/kernel"):
        load_checkpoint(ckpt)
    out = str(root / "err_bad_ckpt_out")
    run_error(["export", "--ckpt", ckpt, "--out", out], capsys, out,
              "does not match its config", "llm/layers/attn/q_proj/kernel", "(3, 32, 32)", "(2, 32, 32)")
