"""Shared helpers and module-scoped fixtures of the conversion tests (test_convert*.py).

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

from llava_jax.convert import ConversionError, export_hf, load_hf  # noqa: E402
from llava_jax.models.weights import load_checkpoint, save_checkpoint  # noqa: E402
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
