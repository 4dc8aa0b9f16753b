"""llava_jax.train.metrics: JSONL log + resume truncation, TensorBoard event files, FLOPs/MFU, plot script.

The event files are read back with TensorBoard's own loaders (the `tensorboard` package,
which checks every record's CRCs), independent of the tensorboardX writer.
"""
import json
import math
import os
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from llava_jax.train.metrics import MetricsWriter, ProgressBar, mfu, peak_flops, read_metrics, transformer_train_flops
from scripts.plot_metrics import main as plot_main


def read_events(path):
    """Event protos of one file, as TensorBoard loads them (a record failing its CRC ends the read)."""
    return list(LegacyEventFileLoader(path).Load())


def _scalars(event):
    return {v.tag: v.simple_value for v in event.summary.value}


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


def test_event_file_round_trip(tmp_path):
    with MetricsWriter(str(tmp_path)) as w:
        w.write(1, {"loss": 2.5, "acc": 0.125, "note": "skipped in tb"})
        events = read_events(w.events_path)  # flushed per step: readable before close
        assert [e.step for e in events] == [0, 1]
        w.write(2, {"loss": 1.5, "big_step_tokens": 4096, "ok": True})
        w.write(2**40, {"loss": float("nan")})
        w.write(-1, {"neg": -2})
        w.write(3, {"note": "no numbers, no event"})
        path = w.events_path
    assert os.listdir(tmp_path / "tb") == [os.path.basename(path)]
    assert os.path.basename(path).startswith("events.out.tfevents.")
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2" and not events[0].summary.value
    steps = [(e.step, _scalars(e)) for e in events[1:]]
    assert steps[:2] == [(1, {"loss": 2.5, "acc": 0.125}), (2, {"loss": 1.5, "big_step_tokens": 4096.0, "ok": 1.0})]
    assert steps[2][0] == 2**40 and math.isnan(steps[2][1]["loss"])
    assert steps[3] == (-1, {"neg": -2.0})
    assert len(steps) == 4
    assert all(e.wall_time > 1e9 for e in events)

    # a flipped byte in the last record fails its CRC: the reader stops before it
    raw = bytearray(open(path, "rb").read())
    raw[-6] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    assert [e.step for e in read_events(path)] == [0, 1, 2, 2**40]


def test_resume_purges_stale_tensorboard_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # both runs in the same second
    with MetricsWriter(str(tmp_path)) as w:
        for step in range(1, 8):
            w.write(step, {"loss": float(step)})
        first = w.events_path
    with MetricsWriter(str(tmp_path), resume_step=5) as w:
        second = w.events_path
        w.write(6, {"loss": 60.0})
    assert second != first and len(read_events(first)) == 8  # the restart did not overwrite the first file
    restart = read_events(second)[1]
    assert restart.step == 6 and restart.session_log.status == restart.session_log.START
    shown = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("loss")
    assert [(s.step, s.value) for s in shown] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]


def test_flops_and_mfu_hand_example():
    # N=1e9 params, 1000 tokens, L=10, H=100, S=50: 6e12 + 12*10*100*50*1000 = 6e12 + 6e8
    assert transformer_train_flops(10**9, 1000, 10, 100, 50) == 6e12 + 6e8
    assert transformer_train_flops(10**9, 1000, 10, 100, 50, lora=True) == 4e12 + 6e8
    assert transformer_train_flops(10**9, 1000, 10, 100, 50, forward_only=True) == 2e12 + 2e8
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
