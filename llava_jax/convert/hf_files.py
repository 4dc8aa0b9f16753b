"""Reading and writing Hugging Face weight directories without loading whole models.

The conversion tools move 7B/13B checkpoints between the HF layout and ours, so
everything here streams: weights are read lazily with ``pread`` (one tensor is
materialised at a time) and written shard by shard.  We implement the small
safetensors format ourselves because the ``safetensors`` package's numpy backend
has no bfloat16, which is the dtype LLaVA checkpoints are stored in.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {str: str}}``, then the raw little-endian tensor bytes, with
offsets relative to the end of the header.  All hosts we target are
little-endian, so the raw bytes are used as-is.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from llava_jax.files import ConversionError


_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST: dict[np.dtype, str] = {dt: name for name, dt in _ST_DTYPES.items()}
_NO_WEIGHTS = "expected model.safetensors, *.safetensors(.index.json) or pytorch_model*.bin"
# Files torch.save() leaves in HF training output that are not state dicts.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}


class _SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ConversionError(
                    f"{path}: truncated safetensors file (header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base, data_size = 8 + n, size - 8 - n
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}  # key -> (dtype, shape)
        self._offsets: dict[str, tuple[int, int]] = {}
        for key, info in header.items():
            try:
                dt = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: bad or unsupported header entry for {key!r}: {info!r}") from None
            if not 0 <= begin <= end <= data_size:
                raise ConversionError(f"{path}: tensor {key!r} offsets [{begin}, {end}] lie outside "
                                      f"the {data_size}-byte data section (truncated file?)")
            if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dt.itemsize:
                raise ConversionError(f"{path}: tensor {key!r} has {end - begin} bytes but shape "
                                      f"{list(shape)} of {info['dtype']} needs {math.prod(shape) * dt.itemsize}")
            self.meta[key], self._offsets[key] = (dt, shape), (begin, end)
        # Read with pread into a fresh buffer rather than mmap: mapped pages would stay in
        # this process's RSS, adding a whole extra copy of the model to the peak.
        self._file = open(path, "rb")

    def get(self, key: str) -> np.ndarray:
        (dt, shape), (begin, end) = self.meta[key], self._offsets[key]
        out = np.empty(end - begin, dtype=np.uint8)
        view, offset = memoryview(out), self._base + begin
        while view.nbytes:  # pread may return short reads for very large tensors
            n = os.preadv(self._file.fileno(), [view], offset)
            if n <= 0:
                raise ConversionError(f"{self.path}: unexpected end of file reading {key!r}")
            view, offset = view[n:], offset + n
        return out.view(dt).reshape(shape)

    def close(self) -> None:
        self._file.close()


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one small .safetensors file (e.g. a reward head)."""
    f = _SafetensorsFile(path)
    try:
        return {key: f.get(key) for key in f.meta}
    finally:
        f.close()


class _TorchFile:
    """One pytorch_model*.bin state dict, loaded with torch's own mmap support."""

    def __init__(self, path: str):
        try:
            import torch  # lazily: only legacy .bin checkpoints need it
        except ImportError:
            raise ConversionError(f"{path}: reading .bin weights needs torch; install torch "
                                  "or convert the checkpoint to safetensors") from None
        self.path, self._torch = path, torch
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (pre-zip) files cannot be mmapped; load them fully
                raise ConversionError(f"{path}: cannot load with torch ({e})") from None
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: cannot load with torch ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
        to_numpy = {getattr(torch, n): np.dtype(n) for n in ("float64", "float32", "float16", "int64",
                                                             "int32", "int16", "int8", "uint8", "bool")}
        to_numpy[torch.bfloat16] = np.dtype(ml_dtypes.bfloat16)
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for key, t in state.items():
            if not isinstance(t, torch.Tensor) or t.dtype not in to_numpy:
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConversionError(f"{path}: entry {key!r} is not a supported tensor ({what})")
            self.meta[key] = (to_numpy[t.dtype], tuple(t.shape))
        self._state = state

    def get(self, key: str) -> np.ndarray:
        torch = self._torch
        t = self._state[key].detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    def close(self) -> None:
        self._state = {}


def _find_index(directory: str, preferred: str, pattern: str) -> tuple[str | None, dict[str, str]]:
    """(path, weight_map) of the preferred index, else of the only one matching pattern."""
    found = [os.path.join(directory, preferred)]
    if not os.path.isfile(found[0]):
        found = sorted(glob.glob(os.path.join(directory, pattern)))
    if len(found) > 1:
        raise ConversionError(f"{directory}: several weight index files, cannot choose: "
                              + ", ".join(os.path.basename(p) for p in found))
    if not found:
        return None, {}
    try:
        with open(found[0]) as f:
            weight_map = dict(json.load(f)["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{found[0]}: unreadable weight index ({type(e).__name__}: {e})") from None
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(directory, shard)):
            raise ConversionError(f"{found[0]}: shard {shard} named in the index is missing")
    return found[0], weight_map


class TensorSource:
    """Lazy read access to every weight of an HF model directory."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ConversionError(f"no weights found in {directory}: directory does not exist")
        self.directory = directory
        opener: type[_SafetensorsFile] | type[_TorchFile] = _SafetensorsFile
        index, weight_map = _find_index(directory, "model.safetensors.index.json", "*.safetensors.index.json")
        names = sorted(set(weight_map.values())) if index else \
            sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
        if not names:  # safetensors always win; .bin is the legacy fallback
            opener = _TorchFile
            index, weight_map = _find_index(directory, "pytorch_model.bin.index.json", "*.bin.index.json")
            bins = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))]
            names = sorted(set(weight_map.values())) if index else \
                sorted(b for b in bins if b.startswith("pytorch_model")) or \
                sorted(b for b in bins if b not in _NOT_WEIGHTS)
        if not names:
            raise ConversionError(f"no weights found in {directory}: {_NO_WEIGHTS}")

        self.files: list[str] = [os.path.join(directory, n) for n in names]
        self._readers: list[_SafetensorsFile | _TorchFile] = []
        self._where: dict[str, _SafetensorsFile | _TorchFile] = {}
        try:
            for path in self.files:
                reader = opener(path)
                self._readers.append(reader)
                for key in reader.meta:
                    if key in self._where:
                        raise ConversionError(f"duplicate tensor {key!r} in {self._where[key].path} and {path}")
                    self._where[key] = reader
            for key, shard in weight_map.items():
                if key not in self._where or os.path.basename(self._where[key].path) != shard:
                    raise ConversionError(f"{index}: tensor {key!r} is mapped to {shard} but is not stored there")
        except BaseException:
            self.close()
            raise

    def _reader(self, key: str) -> _SafetensorsFile | _TorchFile:
        try:
            return self._where[key]
        except KeyError:
            raise ConversionError(f"tensor {key!r} not found in {self.directory}") from None

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).meta[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._reader(key).meta[key][0]

    def get(self, key: str) -> np.ndarray:
        return self._reader(key).get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers, self._where = [], {}

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare(name: str, value: object) -> tuple[np.ndarray, str]:
    """C-contiguous little-endian array plus its safetensors dtype name."""
    array = np.ascontiguousarray(np.asarray(value))
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    try:
        return array, _NP_TO_ST[array.dtype]
    except KeyError:
        raise ConversionError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors") from None


def write_safetensors(path: str, tensors: dict[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write one .safetensors file: header from shapes/dtypes, then each tensor's bytes in order."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ConversionError(f"{path}: safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    prepared, offset = [], 0
    for name, value in items:
        if name in header:
            raise ConversionError(f"{path}: duplicate tensor name {name!r}")
        array, st_dtype = _prepare(name, value)
        header[name] = {"dtype": st_dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        prepared.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad like the reference writer so the data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in prepared:
            if array.size:  # write the buffer directly: no extra tobytes() copy
                f.write(array.reshape(-1).view(np.uint8).data)


def write_sharded(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 5 * 2**30, prefix: str = "model") -> list[str]:
    """Stream tensors into HF-style shards (plus index if more than one); returns files written."""
    os.makedirs(out_dir, exist_ok=True)
    weight_map: dict[str, int] = {}  # name -> shard number, until the shard count is known
    temp_paths: list[str] = []
    shard: list[tuple[str, np.ndarray]] = []
    shard_bytes = total_size = 0

    def flush() -> None:
        # The final names need the shard count, so write under a temporary name first.
        temp_paths.append(os.path.join(out_dir, f".{prefix}-{len(temp_paths) + 1:05d}.safetensors.tmp"))
        write_safetensors(temp_paths[-1], shard, metadata={"format": "pt"})  # HF rejects files without it
        shard.clear()

    try:
        for name, value in tensors:
            if name in weight_map:
                raise ConversionError(f"{out_dir}: duplicate tensor name {name!r}")
            array = np.asarray(value)
            if shard and shard_bytes + array.nbytes > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard.append((name, array))
            weight_map[name] = len(temp_paths)
            shard_bytes += array.nbytes
            total_size += array.nbytes
        if shard or not temp_paths:
            flush()
    except BaseException:
        for tmp in temp_paths:  # never leave half a checkpoint behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise

    count = len(temp_paths)
    if count == 1:
        final = [os.path.join(out_dir, f"{prefix}.safetensors")]
    else:
        final = [os.path.join(out_dir, f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)]
    for tmp, dst in zip(temp_paths, final):
        os.replace(tmp, dst)
    if count > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {n: os.path.basename(final[i]) for n, i in weight_map.items()}}
        final.append(os.path.join(out_dir, f"{prefix}.safetensors.index.json"))
        with open(final[-1], "w") as f:  # same layout transformers' save_pretrained produces
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return final
