"""The SFT/RM loop: mesh invariance, SIGKILL at any point + rerun (each step logged once, the\nexport complete or absent, `requires` reruns what a kill left unexported), loss goes down,\nconfig errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.tiny_sft import get_config as tiny_sft
from llava_jax.models.weights import load_checkpoint
from llava_jax.settings import RunSettings
from llava_jax.stages import run_requirements
from ppo_helpers import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# A schedule that does not depend on the run's length: runs of 3 and 8 steps on one mesh then
# compile the same step, and the persistent compile cache serves the second.
SCHEDULE = {"schedule": "constant", "warmup_steps": 2}


def _cfg(workdir, steps, mesh=(1, -1, 1)):
    cfg = tiny_sft()
    cfg.workdir = str(workdir)
    cfg.train.max_steps = steps
    cfg.optim.update(SCHEDULE)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    cfg.checkpoint.every = 100
    cfg.log.tensorboard = False
    cfg.data.workers = 0
    cfg.data.num_buckets = 1  # one shape: one compile per run
    return cfg


@pytest.mark.slow
def test_same_sft_steps_on_one_device_and_on_8_device_meshes(tmp_path):
    os.chdir(ROOT)
    losses = {}
    for mesh in [(1, 1, 1), (1, 8, 1), (2, 2, 2)]:  # fsdp alone, then every axis split (data included)
        run_config(_cfg(tmp_path / "x".join(map(str, mesh)), 3, mesh))
        losses[mesh] = _losses(tmp_path / "x".join(map(str, mesh)))
    assert len(losses[(1, 1, 1)]) == 3
    for mesh, values in losses.items():
        np.testing.assert_allclose(values, losses[(1, 1, 1)], rtol=0, atol=1e-5, err_msg=str(mesh))


def _train_cmd(workdir, steps):
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_sft.py"),
            f"--config.workdir={workdir}", f"--config.train.max_steps={steps}", "--config.checkpoint.every=1",
            "--config.log.tensorboard=False", "--config.data.workers=0", "--config.data.num_buckets=1",
            *(f"--config.optim.{k}={v}" for k, v in SCHEDULE.items())]


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_losses(tmp_path):
    steps = 8
    env = {**os.environ, "PYTHONPATH": ROOT}  # conftest's matmul precision included
    os.chdir(ROOT)
    reference = _cfg(tmp_path / "full", steps)
    reference.checkpoint.every = 1
    run_config(reference)  # uninterrupted, in-process (same devices and config as the subprocesses)
    full = _losses(tmp_path / "full")
    assert len(full) == steps and np.mean(full[-3:]) < full[0] - 0.3  # tiny_sft lowers the loss

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted = _losses(killed)
    assert 4 <= len(interrupted) < steps
    # Killed again as soon as the last checkpoint is on disk: before or during the export.
    proc = subprocess.Popen(_train_cmd(killed, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoints" / str(steps)).is_dir():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / str(steps)).is_dir()
    if (killed / "model").exists():  # the export is atomic: complete or absent
        load_checkpoint(str(killed / "model"))
    # A stage that requires this run: the model is missing, or there, never half-written; the
    # requirement reruns it when missing, which restores the last step and exports, training nothing.
    config_file = tmp_path / "killed_config.py"
    config_file.write_text(_config_source(killed, steps))
    dependent = RunSettings.from_config(_cfg(tmp_path / "dependent", 1)).replace(requires=str(config_file))
    run_requirements(dependent)
    load_checkpoint(str(killed / "model"))
    assert _losses(killed) == full  # every step once, bit-identical on CPU


def _config_source(workdir, steps) -> str:
    """A config file with _train_cmd's overrides (a required stage runs from its own file). Its
    data paths are absolute: relative ones would resolve against its own project root (the
    directory above its folder), which holds no data."""
    return (f"import os\n\nfrom configs.tiny_sft import get_config as tiny_sft\n\n\ndef get_config():\n"
            f"    c = tiny_sft()\n    c.workdir, c.train.max_steps, c.checkpoint.every = {str(workdir)!r}, {steps}, 1\n"
            f"    c.log.tensorboard, c.data.workers, c.data.num_buckets = False, 0, 1\n"
            f"    for name in ('train', 'image_folder', 'tokenizer'):\n"
            f"        c.data[name] = os.path.join({ROOT!r}, c.data[name])\n"
            f"    c.optim.update({SCHEDULE!r})\n    return c\n")


def test_bad_config_fails_before_device_work(tmp_path, capsys):
    cfg = _cfg(tmp_path, 1)
    cfg.stage = "dpo"
    with pytest.raises(ValueError, match="config.stage='dpo'"):
        run_config(cfg)
    cfg = _cfg(tmp_path, 1, mesh=(3, 3, 1))
    with pytest.raises(ValueError, match="needs 9 devices, but 8 are available"):
        run_config(cfg)
    from configs.tiny_rm import get_config as tiny_rm

    cfg = tiny_rm()
    cfg.workdir, cfg.model.init, cfg.train.grad_accum = str(tmp_path / "rm"), "tiny", 2
    with pytest.raises(ValueError, match="config.train.grad_accum=2: the RM step takes whole batches"):
        run_config(cfg)
    cfg = _cfg(tmp_path, 1)
    cfg.data.train = "nope.json"
    with pytest.raises(ValueError, match="config.data.train='nope.json' does not exist"):
        run_config(cfg)
    # A required stage runs from its own file and says which overrides it does not take.
    config_file = tmp_path / "required.py"
    config_file.write_text(_config_source(tmp_path / "required", 1))
    dependent = RunSettings.from_config(_cfg(tmp_path / "dependent", 1)).replace(requires=str(config_file))
    run_requirements(dependent, overrides=["--config.optim.learning_rate=0.5"])
    assert (f"requirement {config_file} runs from its own file: it does not take the overrides "
            "--config.optim.learning_rate=0.5") in capsys.readouterr().out
    # A mistyped override: one line naming it and the closest fields, no traceback.
    result = subprocess.run(_train_cmd(tmp_path / "w", 1) + ["--config.train.batch_sise=3"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --config.train.batch_sise: no such config field; closest: train.batch_size,")
