"""Multi-process training (issue 5): `scripts/train.py` as 2 `jax.distributed` processes on
localhost (CPU, one device each) gives the same per-step losses as 1 process with 2 devices.

Each process loads its own shard (perm[p::2], batch_size // 2 rows), so a global batch holds
the same examples as the 1-process batch (in another row order); the SFT loss is a
token-weighted mean over the global batch, so it agrees to float rounding. Children run in
their own process groups and are killed on failure or timeout, so a peer left waiting in a
collective cannot hang the suite.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per run (both processes); normally ~15-25 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _cmd(workdir, extra=()) -> list:
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
            "--config", os.path.join(ROOT, "configs", "tiny_sft.py"), f"--config.workdir={workdir}",
            "--config.train.max_steps=3", "--config.log.tensorboard=False", "--config.data.workers=0",
            "--config.checkpoint.every=100", *extra]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and anything it started
        except ProcessLookupError:
            pass
    proc.wait()


def _run_all(cmds: list, env: dict, logdir) -> None:
    """Runs `cmds` concurrently; any failure or the timeout kills all of them and fails."""
    os.makedirs(logdir, exist_ok=True)
    procs, logs = [], []
    try:
        for i, cmd in enumerate(cmds):
            log = open(os.path.join(logdir, f"process_{i}.log"), "wb")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                failed = [i for i, c in enumerate(codes) if c is None]
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            _kill(p)
        for log in logs:
            log.close()
    if failed:
        tails = []
        for i in failed:
            with open(os.path.join(logdir, f"process_{i}.log"), errors="replace") as f:
                tails.append(f"--- process {i} (rc={procs[i].returncode}):\n" + f.read()[-3000:])
        pytest.fail("training run failed or timed out\n" + "\n".join(tails))


def _losses(workdir) -> list:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _two_processes(workdir, extra=()) -> None:
    coordinator = f"127.0.0.1:{_free_port()}"
    cmds = [_cmd(workdir, extra) + [f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"]
            for i in range(2)]
    _run_all(cmds, _env(1), os.path.join(workdir, "logs"))


def _one_process(workdir, extra=()) -> None:
    _run_all([_cmd(workdir, extra)], _env(2), os.path.join(workdir, "logs"))


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    _one_process(tmp_path / "single")
    _two_processes(tmp_path / "multi")
    single, multi = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert len(single) == 3 and len(multi) == 3
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-5)
    # Only process 0 writes metrics; both saved the final checkpoint together.
    assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "3")
