"""Test-wide setup: 8 forced CPU devices (for sharding tests) and float32 matmuls."""
import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests run the same step with the same shapes in new jit closures (each driver run,
# each subprocess): a per-session persistent compilation cache compiles each program once.
_CACHE = tempfile.mkdtemp(prefix="llava_jax_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # inherited by the tests' subprocesses
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> tuple[str, str]:
    """tiny_sft then tiny_rm, as configured, once per session: (SFT model dir, RM adapter dir),
    metrics.jsonl beside each. The RM accuracy test and the PPO tests share it."""
    from ppo_helpers import make_world

    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return make_world(str(tmp_path_factory.mktemp("toy_world")))
