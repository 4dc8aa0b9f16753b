"""No libtpu probe on a host without a TPU (llava_jax/platforms.py): a driver started with
JAX_PLATFORMS unset prints none of libtpu's start-up errors here (libtpu is installed by the
test extra, this host has no TPU), while a TPU sign or an explicit choice leaves JAX's own
backend search alone."""
import os
import subprocess
import sys

import pytest

from llava_jax import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_NOISE = ("Source Location Trace", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "libtpu")


def _env(**changes: str | None) -> dict:
    """This process's environment without the test-wide JAX_PLATFORMS=cpu (what a user's shell
    has), plus `changes` (None removes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _chosen(env: dict) -> str:
    code = "from llava_jax.platforms import skip_absent_tpu; print(skip_absent_tpu())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(bool(platforms.tpu_signs()), reason="this host looks like a TPU host")
def test_the_driver_starts_jax_without_libtpu_noise():
    """train.py starts JAX's backends (it counts the devices, then refuses a 3-device mesh on
    this 1-device host): stderr has the one-line refusal and nothing from libtpu."""
    result = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/tiny_sft.py",
                             "--config.mesh.fsdp=3", "--config.workdir=/nonexistent/never_written"],
                            cwd=ROOT, env=_env(XLA_FLAGS=None), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "needs 3 devices, but 1 are available" in result.stderr  # the backend did start
    noise = [line for line in result.stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)]
    assert noise == [], "\n".join(noise)


@pytest.mark.skipif(bool(platforms.tpu_signs()), reason="this host looks like a TPU host")
def test_only_an_absent_tpu_is_skipped_and_an_explicit_choice_wins():
    assert _chosen(_env()) == "cpu"  # no TPU, no GPU here
    assert _chosen(_env(JAX_FORCE_TPU_INIT="1")) == "None"  # a TPU sign: JAX's search as before
    assert _chosen(_env(JAX_PLATFORMS="")) == "None"  # '' is JAX's "choose for me"


def test_tpu_signs_count_device_nodes_not_the_vfio_control_node(monkeypatch):
    nodes = {"/dev/accel*": [], "/dev/vfio/*": ["/dev/vfio/vfio"]}
    # (glob is one module: JAX's PCI scan sees no devices either)
    monkeypatch.setattr(platforms.glob, "glob", lambda pattern: nodes.get(pattern, []))
    monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
    assert platforms.tpu_signs() == []
    nodes["/dev/vfio/*"] = ["/dev/vfio/vfio", "/dev/vfio/0"]
    nodes["/dev/accel*"] = ["/dev/accel0"]
    assert platforms.tpu_signs() == ["/dev/accel0", "/dev/vfio/0"]


def test_a_visible_gpu_is_named_only_with_its_plugin(monkeypatch):
    from jax._src import hardware_utils

    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: True)
    monkeypatch.setattr(hardware_utils, "num_available_amd_gpus", lambda stop_at=None: 0)
    monkeypatch.setattr(platforms, "_installed_plugins", lambda: set())
    assert platforms.visible_gpu_platforms() == []  # a GPU but a CPU-only jax: cpu, not a failing "cuda"
    monkeypatch.setattr(platforms, "_installed_plugins", lambda: {"xla_cuda12"})
    assert platforms.visible_gpu_platforms() == ["cuda"]
