"""`tools/convert_hf.py` on bad input: one `error:` line, exit status 2, no output left."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_helpers  # noqa: F401  (fixtures)
from convert_helpers import *  # noqa: F401,F403  (helpers and module-scoped fixtures)

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
