"""Compiling for a TPU slice from this CPU host with the real TPU compiler (libtpu, no TPU):
a tiny model compiles for v5e-8 with the compiler's memory and cost figures, one that does
not fit is refused by the compiler with a clear line, and slice names resolve to libtpu's
topologies."""
import os

import pytest

from configs.tiny_rm import get_config as tiny_rm
from llava_jax import sharding
from llava_jax.aot import compile_check as cc, targets
from llava_jax.settings import RunSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def v5e_mesh():
    devices = targets.target_devices(targets.parse_target("tpu-v5e-8"))
    assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"
    return sharding.make_mesh((1, 8, 1), devices)


def _rm(batch_size: int, max_length: int):
    os.chdir(ROOT)
    cfg = tiny_rm()
    cfg.train.batch_size, cfg.data.max_length = batch_size, max_length
    return RunSettings.from_config(cfg)


@pytest.mark.slow
def test_tiny_rm_step_compiles_for_v5e_8(v5e_mesh):
    cfg = _rm(16, 128)
    logs: list[str] = []
    (report,) = cc.check(cfg, v5e_mesh, log=logs.append)
    assert "model.cpu_shapes: off (auto on tpu devices)" in logs  # the target's forms, not this CPU's
    assert not report.error and report.fits(targets.GENERATIONS["v5e"].hbm_bytes)
    assert 0 < report.peak < 2**30 and report.temp > 0 and report.model_flops > 0
    # The compiler's peak: the step's buffers and its live temporaries, nothing counted twice.
    assert report.peak == report.memory["argument"] + report.memory["output"] - report.memory["alias"] + report.temp


@pytest.mark.slow
def test_a_step_that_does_not_fit_is_refused_by_the_compiler(v5e_mesh, capsys):
    """8192 pairs x 2048 tokens of activations on 16 GiB chips: the TPU compiler says no."""
    from scripts.compile_check import main

    cfg = _rm(8192, 2048)
    (report,) = cc.check(cfg, v5e_mesh, log=print)
    assert "RESOURCE_EXHAUSTED" in report.error or "exceeds available HBM" in report.error
    assert not report.fits(1 << 60)
    assert "the compiler refused it" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/tiny_rm.py", "--target", "tpu-v5e-8", "--config.train.batch_size=8192",
              "--config.data.max_length=2048"])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "| rm_step |" in printed and "refused: " in printed and "| NO |" in printed


@pytest.mark.parametrize("name, topology, devices", [
    ("tpu-v5e-8", "v5e:2x4", 8), ("tpu-v4-8", "v4:2x2x1", 4), ("tpu-v5p-16", "v5:2x2x2", 8),
    ("tpu-v6e-16", "v6e:4x4", 16), ("tpu-v5e-16x2", "v5e:4x4", 32)])
def test_slice_names(name, topology, devices):
    target = targets.parse_target(name)
    assert (target.topology, target.num_devices) == (topology, devices)


def test_bad_slice_names_say_what_is_expected():
    for name in ("tpu-v5e-12", "tpu-v4-7", "v5e-8", "tpu-v3-8"):
        with pytest.raises(ValueError, match="tpu-"):
            targets.parse_target(name)
