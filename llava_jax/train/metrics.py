"""Training metrics: JSONL log, TensorBoard event files, FLOPs/MFU and a progress bar.

`MetricsWriter` appends one JSON object per step to `<workdir>/metrics.jsonl`
(`{"step": 10, "loss": 1.23, ...}`, flushed per line) and mirrors numeric values as
TensorBoard scalars in `<workdir>/tb/events.out.tfevents.<time>.<host>`, written with
tensorboardX (no TensorFlow; TensorBoard is only needed to *view* them). Non-finite
floats (NaN/inf) are written to JSONL as `null` so every line stays strict JSON (readable by any parser);
TensorBoard gets the real float, which it displays natively.

Only process 0 writes; other processes get no-op writers and disabled progress bars.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from typing import Any

from tqdm import tqdm

# --- metrics writer ----------------------------------------------------------------------
class _EventFile:
    """One TensorBoard event file, written through tensorboardX's record writer and protos.

    Not tensorboardX's SummaryWriter: that one queues events for a background thread and
    flushes them every two minutes, so a killed run would lose its last minutes of scalars;
    here every event is on disk when `MetricsWriter.write` returns, like the JSONL line.
    """

    def __init__(self, tb_dir: str, resume_step: int | None):
        # imported here: tensorboardX imports torch when it is installed (~1.5 s), which runs
        # with TensorBoard off, and processes other than 0, need not pay
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter

        os.makedirs(tb_dir, exist_ok=True)
        self.path = base = os.path.join(tb_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        for n in itertools.count(1):  # the writer truncates: a same-second restart gets a new name,
            if not os.path.exists(self.path):  # which sorts after the old one as TensorBoard reads them
                break
            self.path = f"{base}.{n}"
        self._writer = RecordWriter(self.path)
        self._write(Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
        if resume_step is not None:  # TensorBoard drops this run's older events from this step on
            start = SessionLog(status=SessionLog.START)
            self._write(Event(wall_time=time.time(), step=resume_step + 1, session_log=start))

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One event holding every scalar of the step."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._writer.close()


def _to_python(key: str, value: Any) -> Any:
    """numpy/jax scalars -> int/float; strings and bools pass through; arrays are refused."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy / jax (0-d) arrays
        value = value.item()
    if isinstance(value, (int, float)):  # bool is an int: kept as true/false in JSON, 0/1 in TensorBoard
        return value
    raise TypeError(f"metric {key!r}: expected a scalar, got {type(value).__name__}")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; unparseable lines (a line cut short by a kill) are skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class MetricsWriter:
    """`write(step, metrics)` -> one JSON line in workdir/metrics.jsonl (+ TensorBoard scalars).

    resume_step: the step of the checkpoint being resumed. Lines with a later step were logged
    by a run that died before checkpointing them; they are dropped (atomic rewrite), and the
    event file starts with a SessionLog START at resume_step + 1, which tells TensorBoard to
    discard its stale events from that step on.
    """

    def __init__(self, workdir: str, *, process_index: int = 0, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.active = process_index == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = None
        self._events: _EventFile | None = None
        self.events_path: str | None = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: a kill now leaves either the old or new file
        self._jsonl = open(self.path, "a")
        if self._jsonl.tell() and not _ends_with_newline(self.path):
            self._jsonl.write("\n")  # end a line cut short by a kill, so the next record starts clean
        if tensorboard:
            self._events = _EventFile(os.path.join(workdir, "tb"), resume_step)
            self.events_path = self._events.path

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        if self._jsonl is None:
            raise ValueError("MetricsWriter is closed")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument")
        values = {k: _to_python(k, v) for k, v in metrics.items()}
        record = {"step": int(step)}
        record.update({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}  # bools count as 0/1
        if self._events is not None and scalars:
            self._events.scalars(int(step), scalars)

    def close(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.close()
        self._jsonl = self._events = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- FLOPs and model FLOPs utilization --------------------------------------------------
def transformer_train_flops(num_params: int, tokens: int, num_layers: int, hidden: int, seq_len: int,
                            *, lora: bool = False, forward_only: bool = False) -> float:
    """Model FLOPs of one step over `tokens` tokens (the global batch, padding included): the
    one FLOP formula (the trainers' MFU, the compile check, the benchmarks).

    Weights: forward 2*N per token, backward 2*N for activation gradients + 2*N for weight
    gradients = 6*N. With LoRA the base weights are frozen, so their weight-gradient matmuls
    are skipped: 4*N (adapter FLOPs are negligible and ignored). Attention scores/values
    (QK^T and AV): 4*L*H*seq_len per token forward, twice that backward = 12*L*H*seq_len;
    the LoRA flag leaves it unchanged, since those matmuls have no weights and both backward
    products are activation gradients still needed to reach earlier adapters. Causal masking
    is not discounted (kernels usually compute the full square). `forward_only`: one forward
    pass, 2*N + 4*L*H*seq_len per token (scoring, sampling, a frozen vision tower).
    """
    attention = 4 * num_layers * hidden * seq_len * tokens
    if forward_only:
        return float(2 * num_params * tokens + attention)
    per_token_weights = (4 if lora else 6) * num_params
    return float(per_token_weights * tokens + 3 * attention)


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Achieved FLOP/s over the devices' combined peak, a fraction in [0, 1] for sane inputs."""
    if step_seconds <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
        raise ValueError("step_seconds, peak_flops_per_device and num_devices must be positive")
    return flops_per_step / (step_seconds * peak_flops_per_device * num_devices)


# (substring of the lowercased jax `device.device_kind`, dense bf16 peak FLOP/s per device);
# first match wins, so more specific names come first ("v5 lite" before "v5").
_PEAK_FLOPS = [
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12),
    ("tpu v5", 459e12), ("v4", 275e12),
]


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of one device by its jax `device_kind`, or None (CPU / unknown)."""
    kind = device_kind.lower()
    return next((peak for key, peak in _PEAK_FLOPS if key in kind), None)


# --- progress bar ------------------------------------------------------------------------
class ProgressBar:
    """tqdm bar of step/total with loss and tokens/s; silent on processes other than 0.

    tokens/s is passed in rather than measured here so the bar shows the same number the
    caller logs (and uses for MFU) instead of a second, differently-timed estimate.
    """

    def __init__(self, total: int, *, initial: int = 0, process_index: int = 0, desc: str = "train"):
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=process_index != 0,
                         dynamic_ncols=True)

    def update(self, step: int, *, loss: float | None = None, tokens_per_second: float | None = None) -> None:
        """Move the bar to `step` (absolute, so skipped or resumed steps need no bookkeeping)."""
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if tokens_per_second is not None:
            postfix["tok/s"] = f"{float(tokens_per_second):,.0f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(records: list[dict]) -> list[str]:
    """Keys (other than step) holding a number in at least one record, first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and _is_number(value):
                keys.setdefault(key, None)
    return list(keys)


def plot(records: list[dict], keys: list[str], out: str, title: str = "") -> None:
    """One subplot per key against step, saved as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")  # training hosts have no display
    import matplotlib.pyplot as plt

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rows = sorted((r["step"], r[key]) for r in records if key in r)
        steps = [s for s, _ in rows]
        values = [v if _is_number(v) else math.nan for _, v in rows]  # nan -> gap in the line
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str, keys: list[str] | None = None, out: str | None = None) -> str:
    """run_dir/metrics.jsonl -> run_dir/metrics.png (the given keys that were logged, or all)."""
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    available = numeric_keys(records)
    keys = [k for k in keys if k in available] if keys else available
    out = out or os.path.join(run_dir, "metrics.png")
    plot(records, keys, out, title=os.path.basename(os.path.normpath(run_dir)))
    return out
