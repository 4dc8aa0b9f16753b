"""llava_jax.metrics: JSONL log + resume truncation, TensorBoard event files, FLOPs/MFU, plot script.

The event files are checked with a decoder written here, independent of the writer's encoder.
"""
import glob
import json
import math
import struct

import numpy as np
import pytest

from llava_jax.metrics import (MetricsWriter, ProgressBar, crc32c, masked_crc32c, mfu, peak_flops,
                               read_metrics, transformer_train_flops)
from scripts.plot_metrics import main as plot_main


def _fields(buf):
    """Protobuf message -> [(field number, value)]: varints as int, everything else as bytes."""
    out, pos = [], 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            value = varint()
        else:
            size = {1: 8, 5: 4}[wire] if wire != 2 else varint()
            value, pos = buf[pos:pos + size], pos + size
        out.append((key >> 3, value))
    return out


def read_events(path):
    """TFRecord framing (CRCs checked) + Event{1 wall_time, 2 step, 3 file_version, 5 summary, 7 session_log}."""
    events, raw, pos = [], open(path, "rb").read(), 0
    while pos < len(raw):
        length_bytes = raw[pos:pos + 8]
        (length,), (length_crc,) = struct.unpack("<Q", length_bytes), struct.unpack("<I", raw[pos + 8:pos + 12])
        data = raw[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        if masked_crc32c(length_bytes) != length_crc or masked_crc32c(data) != data_crc:
            raise ValueError("CRC mismatch")
        pos += 16 + length
        event = {}
        for number, value in _fields(data):
            if number == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif number == 2:
                event["step"] = value - (1 << 64) if value >= 1 << 63 else value
            elif number == 3:
                event["file_version"] = value.decode()
            elif number == 5:
                for _, summary_value in _fields(value):
                    tag_value = dict(_fields(summary_value))
                    event.setdefault("scalars", {})[tag_value[1].decode()] = struct.unpack("<f", tag_value[2])[0]
            elif number == 7:
                event["session_start"] = dict(_fields(value)).get(1) == 1  # SessionLog.status == START
        events.append(event)
    return events


def _lines(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_jsonl_round_trip_and_json_safety(tmp_path):
    import jax.numpy as jnp

    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write(1, {"loss": 2.5, "lr": np.float32(0.5), "tokens": np.int64(128), "acc": jnp.asarray(0.25)})
        w.write(2, {"loss": float("nan"), "grad_norm": np.float64("inf"), "note": "warmup", "ok": True})
        # flushed per line: readable before close
        assert len(_lines(tmp_path / "metrics.jsonl")) == 2
    rows = _lines(tmp_path / "metrics.jsonl")
    assert list(rows[0]) == ["step", "loss", "lr", "tokens", "acc"]
    assert rows[0] == {"step": 1, "loss": 2.5, "lr": 0.5, "tokens": 128, "acc": 0.25}
    assert rows[1] == {"step": 2, "loss": None, "grad_norm": None, "note": "warmup", "ok": True}
    assert not (tmp_path / "tb").exists()
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        with pytest.raises(ValueError):
            w.write(3, {"step": 1})
        with pytest.raises(TypeError):
            w.write(3, {"vec": np.zeros(3)})


def test_resume_drops_later_steps(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        for step in range(1, 8):
            w.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a line cut short by a kill
    with MetricsWriter(str(tmp_path), tensorboard=False, resume_step=5) as w:
        w.write(6, {"loss": 60.0})
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] == 60.0
    assert not list(tmp_path.glob("*.tmp"))


def test_append_after_cut_line_starts_a_fresh_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write(2, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [(1, 1.0), (2, 2.0)]


def test_non_zero_process_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with MetricsWriter(str(run), process_index=1, resume_step=3) as w:
        w.write(1, {"loss": 1.0})
    assert not run.exists()
    bar = ProgressBar(10, process_index=1)
    bar.update(3, loss=1.0, tokens_per_second=100.0)
    bar.close()


def test_crc32c_test_vector():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_file_round_trip(tmp_path):
    with MetricsWriter(str(tmp_path)) as w:
        w.write(1, {"loss": 2.5, "acc": 0.125, "note": "skipped in tb"})
        w.write(2, {"loss": 1.5, "big_step_tokens": 4096})
        w.write(2**40, {"loss": float("nan")})
        w.write(-1, {"neg": -2})
        path = w.events_path
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")) == [path]
    events = read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and "scalars" not in events[0]
    scalars = [(e["step"], e["scalars"]) for e in events[1:]]
    assert scalars[:2] == [(1, {"loss": 2.5, "acc": 0.125}), (2, {"loss": 1.5, "big_step_tokens": 4096.0})]
    assert scalars[2][0] == 2**40 and math.isnan(scalars[2][1]["loss"])
    assert scalars[3] == (-1, {"neg": -2.0})  # negative int64 -> 10-byte varint
    assert all(e["wall_time"] > 1e9 for e in events)

    # a flipped byte is caught by the data CRC
    raw = bytearray(open(path, "rb").read())
    raw[-6] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="CRC"):
        read_events(path)


def test_resume_marks_tensorboard_restart(tmp_path):
    with MetricsWriter(str(tmp_path), resume_step=41) as w:
        w.write(42, {"loss": 1.0})
        events = read_events(w.events_path)
    assert events[1]["step"] == 42 and events[1]["session_start"]
    assert events[2]["scalars"] == {"loss": 1.0}


def test_flops_and_mfu_hand_example():
    # N=1e9 params, 1000 tokens, L=10, H=100, S=50: 6e12 + 12*10*100*50*1000 = 6e12 + 6e8
    assert transformer_train_flops(10**9, 1000, 10, 100, 50) == 6e12 + 6e8
    assert transformer_train_flops(10**9, 1000, 10, 100, 50, lora=True) == 4e12 + 6e8
    # 4e14 FLOPs in 0.5 s on 2 devices of 1e15 peak -> 8e14 / 2e15 = 0.4
    assert mfu(4e14, 0.5, 1e15, 2) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1e15, 1)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5p") == 459e12 and peak_flops("TPU v5") == 459e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None and peak_flops("mystery chip") is None


def test_progress_bar_tracks_absolute_step(capsys):
    with ProgressBar(10, initial=2) as bar:
        bar.update(5, loss=0.5, tokens_per_second=1234.0)
        assert bar._bar.n == 5


def test_plot_script_writes_png(tmp_path, capsys):
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        for step in range(1, 6):
            w.write(step, {"loss": 1.0 / step, "accuracy": step / 10, "note": "x"})
        w.write(6, {"loss": float("nan")})
    out = plot_main([str(tmp_path)])
    assert out == str(tmp_path / "metrics.png")
    assert capsys.readouterr().out.strip() == out
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    custom = tmp_path / "loss.png"
    assert plot_main([str(tmp_path), "--out", str(custom), "--keys", "loss"]) == str(custom)
    assert custom.stat().st_size > 1000
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path), "--keys", "note"])
