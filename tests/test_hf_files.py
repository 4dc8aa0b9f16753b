"""Tests for llava_jax.convert.hf_files against the reference safetensors / torch / transformers."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from llava_jax.convert.hf_files import (
    ConversionError,
    TensorSource,
    write_safetensors,
    write_sharded,
)
from llava_jax.files import atomic_output_dir


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor, so comparisons are bit-exact (NaN payloads, -0.0, bf16)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().copy() if t.numel() else np.zeros(0, np.uint8)


def _np_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _reference_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(3, 5, generator=g)
    f32[0, 0], f32[0, 1] = float("nan"), -0.0
    return {
        "a.f32": f32,
        "b.f16": torch.randn(4, 2, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 7, generator=g).bfloat16(),
        "d.i64": torch.tensor([-(2**62), 0, 2**62 + 3], dtype=torch.int64),
        "e.scalar": torch.tensor(1.5),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
    }


def test_torch_written_file_read_bit_exact(tmp_path):
    ref = _reference_tensors()
    safetensors.torch.save_file(ref, str(tmp_path / "model.safetensors"))
    with TensorSource(str(tmp_path)) as src:
        assert src.keys() == sorted(ref)
        assert src.files == [str(tmp_path / "model.safetensors")]
        assert src.dtype("c.bf16") == np.dtype(ml_dtypes.bfloat16)
        assert src.dtype("d.i64") == np.dtype(np.int64)
        assert src.shape("c.bf16") == (2, 3, 7) and src.shape("e.scalar") == ()
        for key, t in ref.items():
            got = src.get(key)
            assert got.shape == tuple(t.shape), key
            np.testing.assert_array_equal(_np_bits(got), _torch_bits(t), err_msg=key)
        assert "a.f32" in src and "missing" not in src
        with pytest.raises(ConversionError, match="tensor 'missing' not found in"):
            src.get("missing")


def test_get_returns_independent_array(tmp_path):
    write_safetensors(str(tmp_path / "model.safetensors"), {"w": np.arange(6, dtype=np.float32)})
    src = TensorSource(str(tmp_path))
    a = src.get("w")
    src.close()  # the file is closed; the array must still be valid and writable
    assert a.flags.writeable and (a.flags.owndata or a.base.flags.owndata)
    a[0] = 42.0
    np.testing.assert_array_equal(a, [42, 1, 2, 3, 4, 5])


def test_our_file_read_by_torch_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    bf16 = rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)
    ours = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "bf16": bf16,
        "i64": np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
        "noncontig": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # must be written C-ordered
        "big_endian": np.array([1.0, -2.5], dtype=">f4"),
        "empty": np.zeros((0, 3), np.float16),
        "u8": np.array([0, 255], np.uint8),
    }
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, ours, metadata={"format": "pt", "note": "hi"})
    loaded = safetensors.torch.load_file(path)
    assert sorted(loaded) == sorted(ours)
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["i64"].dtype == torch.int64
    for key, a in ours.items():
        expected = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")) if key == "big_endian" else a)
        assert tuple(loaded[key].shape) == a.shape, key
        np.testing.assert_array_equal(_torch_bits(loaded[key]), _np_bits(expected), err_msg=key)
    np.testing.assert_array_equal(loaded["noncontig"].numpy(), ours["noncontig"])
    np.testing.assert_array_equal(loaded["big_endian"].numpy(), [1.0, -2.5])
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    with open(path, "rb") as f:  # data must start 8-byte aligned, as the reference writer does
        assert struct.unpack("<Q", f.read(8))[0] % 8 == 0


def test_write_safetensors_accepts_pairs_and_rejects_duplicates(tmp_path):
    path = str(tmp_path / "p.safetensors")
    write_safetensors(path, iter([("x", np.ones(2, np.int32)), ("y", np.zeros((), np.float64))]))
    loaded = safetensors.torch.load_file(path)
    assert loaded["x"].tolist() == [1, 1] and loaded["y"].dtype == torch.float64
    with pytest.raises(ConversionError, match="duplicate tensor name 'x'"):
        write_safetensors(path, [("x", np.ones(1)), ("x", np.ones(1))])
    with pytest.raises(ConversionError, match="tensor 'c'.*complex64"):
        write_safetensors(path, {"c": np.ones(1, np.complex64)})


def _named_arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        ("model.embed.weight", rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16)),  # 64 bytes
        ("model.layers.0.w", rng.standard_normal((8,)).astype(np.float32)),  # 32 bytes
        ("model.layers.0.b", rng.standard_normal((4,)).astype(np.float32)),  # 16 bytes
        ("model.layers.1.w", rng.standard_normal((60,)).astype(np.float32)),  # 240 bytes > limit
        ("model.norm", np.arange(10, dtype=np.int64)),  # 80 bytes
        ("lm_head", rng.standard_normal((3,)).astype(np.float16)),  # 6 bytes
    ]


def test_write_sharded_several_shards_with_hf_index(tmp_path):
    arrays = _named_arrays()
    out = tmp_path / "out"
    files = write_sharded(str(out), iter(arrays), max_shard_bytes=100)
    # 64+32 | 16 | 240 (alone, over the limit) | 80+6
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [os.path.basename(f) for f in files] == shards + ["model.safetensors.index.json"]
    assert sorted(os.listdir(out)) == sorted(shards + ["model.safetensors.index.json"])  # no temp files left
    index_text = (out / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    assert index["metadata"] == {"total_size": 64 + 32 + 16 + 240 + 80 + 6}
    assert index["weight_map"] == {
        "model.embed.weight": shards[0], "model.layers.0.w": shards[0], "model.layers.0.b": shards[1],
        "model.layers.1.w": shards[2], "model.norm": shards[3], "lm_head": shards[3],
    }
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"  # HF's own layout
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            # every tensor the index maps to this shard is in it, and nothing else
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
    with TensorSource(str(out)) as src:
        assert src.files == [str(out / s) for s in shards]
        assert src.keys() == sorted(name for name, _ in arrays)
        for name, a in arrays:
            assert src.dtype(name) == a.dtype
            np.testing.assert_array_equal(_np_bits(src.get(name)), _np_bits(a), err_msg=name)


def test_write_sharded_single_file_and_duplicates(tmp_path):
    files = write_sharded(str(tmp_path / "one"), _named_arrays())
    assert files == [str(tmp_path / "one" / "model.safetensors")]
    assert os.listdir(tmp_path / "one") == ["model.safetensors"]
    assert safetensors.torch.load_file(files[0])["model.norm"].tolist() == list(range(10))
    with pytest.raises(ConversionError, match="duplicate tensor name 'a'"):
        write_sharded(str(tmp_path / "dup"), [("a", np.ones(4)), ("b", np.ones(4)), ("a", np.ones(1))],
                      max_shard_bytes=8)
    assert os.listdir(tmp_path / "dup") == []  # the shard already flushed was removed again


def test_sharded_output_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in ref.state_dict().items()}
    config.save_pretrained(str(tmp_path))
    files = write_sharded(str(tmp_path), state.items(), max_shard_bytes=3000)
    assert len(files) > 2 and files[-1].endswith("model.safetensors.index.json")
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    got = loaded.state_dict()
    assert sorted(got) == sorted(state)
    for key, value in ref.state_dict().items():
        assert torch.equal(got[key], value), key


def test_bin_directory_read_through_torch(tmp_path):
    ref = {"w.bf16": torch.randn(3, 4).bfloat16(), "b.f32": torch.randn(4), "ids": torch.arange(5)}
    torch.save(ref, str(tmp_path / "pytorch_model.bin"))
    torch.save({"not": "weights"}, str(tmp_path / "training_args.bin"))  # must be ignored
    with TensorSource(str(tmp_path)) as src:
        assert src.files == [str(tmp_path / "pytorch_model.bin")]
        assert src.keys() == ["b.f32", "ids", "w.bf16"]
        assert src.dtype("w.bf16") == np.dtype(ml_dtypes.bfloat16) and src.shape("w.bf16") == (3, 4)
        for key, t in ref.items():
            np.testing.assert_array_equal(_np_bits(src.get(key)), _torch_bits(t), err_msg=key)
        assert src.get("ids").dtype == np.int64


def test_sharded_bin_index(tmp_path):
    torch.save({"a": torch.ones(2)}, str(tmp_path / "pytorch_model-00001-of-00002.bin"))
    torch.save({"b": torch.zeros(3).half()}, str(tmp_path / "pytorch_model-00002-of-00002.bin"))
    index = {"metadata": {}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                            "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with TensorSource(str(tmp_path)) as src:
        assert src.keys() == ["a", "b"] and src.dtype("b") == np.float16
        np.testing.assert_array_equal(src.get("b"), np.zeros(3, np.float16))


def test_safetensors_preferred_over_bin(tmp_path):
    torch.save({"old": torch.ones(1)}, str(tmp_path / "pytorch_model.bin"))
    write_safetensors(str(tmp_path / "model.safetensors"), {"new": np.ones(1, np.float32)})
    with TensorSource(str(tmp_path)) as src:
        assert src.keys() == ["new"]


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(ConversionError, match=r"no weights found in .*nope: directory does not exist"):
        TensorSource(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError) as err:
        TensorSource(str(tmp_path))
    assert str(err.value) == (f"no weights found in {tmp_path}: expected model.safetensors, "
                              "*.safetensors(.index.json) or pytorch_model*.bin")


def test_index_naming_missing_shard(tmp_path):
    write_sharded(str(tmp_path), _named_arrays(), max_shard_bytes=100)
    os.remove(tmp_path / "model-00003-of-00004.safetensors")
    with pytest.raises(ConversionError, match="shard model-00003-of-00004.safetensors named in the index is missing"):
        TensorSource(str(tmp_path))


def test_index_mapping_key_to_wrong_shard(tmp_path):
    write_sharded(str(tmp_path), _named_arrays(), max_shard_bytes=100)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head"] = "model-00001-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="tensor 'lm_head' is mapped to model-00001-of-00004.safetensors"):
        TensorSource(str(tmp_path))


@pytest.mark.parametrize("keep, message", [
    (4, r"model.safetensors: truncated safetensors file \(4 bytes, no header\)"),
    (20, r"model.safetensors: truncated safetensors file \(header claims \d+ bytes, file has 20\)"),
    (-3, r"model.safetensors: tensor 'w' offsets \[0, 40\] lie outside the 37-byte data section"),
])
def test_truncated_file(tmp_path, keep, message):
    path = tmp_path / "model.safetensors"
    write_safetensors(str(path), {"w": np.ones(10, np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ConversionError, match=message):
        TensorSource(str(tmp_path))


def test_header_size_not_matching_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    with pytest.raises(ConversionError, match=r"tensor 'w' has 20 bytes but shape \[2, 3\] of F32 needs 24"):
        TensorSource(str(tmp_path))
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ConversionError, match="bad or unsupported header entry for 'w'"):
        TensorSource(str(tmp_path))


def test_duplicate_key_across_shards(tmp_path):
    write_safetensors(str(tmp_path / "a.safetensors"), {"w": np.ones(1, np.float32)})
    write_safetensors(str(tmp_path / "b.safetensors"), {"w": np.zeros(1, np.float32)})
    with pytest.raises(ConversionError, match=r"duplicate tensor 'w' in .*a.safetensors and .*b.safetensors"):
        TensorSource(str(tmp_path))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_dir_cleans_up_on_failure(tmp_path, exc):
    target = tmp_path / "converted"
    with pytest.raises(exc):
        with atomic_output_dir(str(target)) as tmp:
            assert tmp == f"{target}.partial-{os.getpid()}"
            write_safetensors(os.path.join(tmp, "model.safetensors"), {"w": np.ones(3)})
            raise exc("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_success_and_refusal(tmp_path):
    target = tmp_path / "converted"
    with atomic_output_dir(str(target) + "/") as tmp:  # a trailing slash must not matter
        write_sharded(tmp, [("w", np.ones(3, np.float32))])
        assert not target.exists()  # nothing visible until the body completes
    assert os.listdir(tmp_path) == ["converted"] and os.listdir(target) == ["model.safetensors"]

    entered = False
    with pytest.raises(ConversionError, match="output .*converted already exists"):
        with atomic_output_dir(str(target)):
            entered = True
    assert not entered  # refused before anything was written


def test_atomic_output_dir_overwrite_replaces_only_on_success(tmp_path):
    target = tmp_path / "converted"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output_dir(str(target), overwrite=True) as tmp:
            (tmp_path / tmp / "new.txt").write_text("new")
            raise ValueError
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["converted"]
    with atomic_output_dir(str(target), overwrite=True) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # the old output survives until the new one is complete
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["converted"]


def test_bin_without_torch_installed(tmp_path, monkeypatch):
    torch.save({"a": torch.ones(1)}, str(tmp_path / "pytorch_model.bin"))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ConversionError, match="pytorch_model.bin: reading .bin weights needs torch; install torch "
                                              "or convert the checkpoint to safetensors"):
        TensorSource(str(tmp_path))
