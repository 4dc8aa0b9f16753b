"""GPU compile targets (h100-8, h200-8, h100-1, h100-8x2): the names resolve to the CUDA
plugin's topologies and device figures, and without the plugin (CI installs '.[test]' only)
the check stops with one line saying what to install. With the `gpu` extra installed, a tiny
step compiles for 8 H100s with XLA's CUDA compiler on this CPU host, and one too large for
the device is reported NO (the GPU compiler itself compiles any size)."""
import os
import subprocess
import sys

import pytest

from llava_jax.aot import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_plugin = pytest.mark.skipif(not targets.cuda_plugin_installed(), reason="JAX's CUDA plugin: pip install -e '.[gpu]'")


@pytest.mark.parametrize("name, topology, devices, memory_gib", [
    ("h100-8", "1x1x8", 8, 79.2), ("h200-8", "1x1x8", 8, 141.0), ("h100-1", "1x1x1", 1, 79.2),
    ("h100-8x2", "1x2x8", 16, 79.2)])
def test_gpu_target_names(name, topology, devices, memory_gib):
    target = targets.parse_target(name)
    assert isinstance(target, targets.GpuTarget)
    assert (target.topology, target.num_devices, round(target.memory_bytes / targets.GiB, 1)) == (
        topology, devices, memory_gib)
    config = targets.gpu_target_config(target.model)
    assert f"device_memory_size: {target.memory_bytes}" in config and f'"{target.model.description}"' in config


def test_bad_gpu_names_say_what_is_expected():
    for name in ("h100-3", "h100", "a100-8", "h200-16"):
        with pytest.raises(ValueError, match="h100-8"):
            targets.parse_target(name)


def test_without_the_plugin_the_check_says_what_to_install(monkeypatch):
    monkeypatch.setattr(targets, "cuda_plugin_installed", lambda: False)
    with pytest.raises(ValueError, match=r"needs JAX's CUDA plugin: pip install .*'\.\[gpu\]'"):
        targets.target_devices(targets.parse_target("h100-8"))


def _check(*extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
    return subprocess.run([sys.executable, "scripts/compile_check.py", "--config", "configs/tiny_rm.py", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(targets.cuda_plugin_installed(), reason="the plugin is installed here")
def test_the_script_stops_with_one_line_without_the_plugin():
    result = _check("--target", "h100-8")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --target h100-8 needs JAX's CUDA plugin")


@needs_plugin
def test_tiny_rm_compiles_for_8_h100s_and_an_oversized_batch_does_not_fit():
    result = _check("--target", "h100-8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 NVIDIA H100 80GB HBM3 devices of h100-8 (the CUDA compiler" in result.stdout
    assert "| rm_step |" in result.stdout and result.stdout.rstrip().count("| yes |") == 1
    # 8192 pairs x 2048 tokens: far beyond 79 GiB per device, compiled all the same, reported NO.
    result = _check("--target", "h100-8", "--config.train.batch_size=8192", "--config.data.max_length=2048")
    assert result.returncode == 1, result.stderr[-3000:]  # a step that does not fit fails the check
    row = next(line for line in result.stdout.splitlines() if line.startswith("| rm_step |"))
    assert row.endswith("| NO |")
