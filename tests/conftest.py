"""Test-wide setup: 8 forced CPU devices (for sharding tests) and float32 matmuls."""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # the subprocesses too: they compile alike

# Many tests run the same step with the same shapes in new jit closures (each driver run,
# each subprocess, each pytest-xdist worker): a per-session persistent compilation cache
# compiles each program once. The workers inherit the cache of the process that starts them.
_OWN_CACHE = "LLAVA_JAX_TEST_XLA_CACHE" not in os.environ  # made here (not inherited, not the caller's)
if _OWN_CACHE:  # (a setdefault would make an unused directory in every worker too)
    os.environ["LLAVA_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="llava_jax_xla_cache_")
_CACHE = os.environ["LLAVA_JAX_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # inherited by the tests' subprocesses
jax.config.update("jax_compilation_cache_dir", _CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"  # the subprocesses too
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> tuple[str, str]:
    """The README's chain with a shorter SFT, once per session: tiny_sft for 20 epochs (30
    configured), then tiny_rm as configured over it; (SFT model dir, RM adapter dir),
    metrics.jsonl beside each. Over seeds 0-2 the SFT model still sees and hallucinates
    (recall 0.86-0.90, hallucinating describe answers 0.41-0.47) and the RM ranks
    0.93 / 0.93 / 0.94 of the held-out pairs (tests/test_toy_rlhf.py; measured after the
    chunked head loss, whose float rounding differs: 0.93 / 0.97 / 0.95 before)."""
    from ppo_helpers import make_world_on_one_device

    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return make_world_on_one_device(str(tmp_path_factory.mktemp("toy_world")), sft_epochs=20.0)


# The longest modules first: pytest-xdist hands out whole files in collection order, so a
# long file collected last would run alone at the end while the other worker idles. xdist's
# --dist loadfile sorts files by their number of tests unless told not to (pytest_configure
# below): toy_rlhf's 2 tests then ran last, ~5 minutes on one worker while the other idled.
# A worker with <= 2 tests pending takes the next file at once: test_toy_rlhf.py (2 tests)
# takes its second file when it starts, so a short one (test_data_templates.py) follows it,
# not test_distributed.py.
SLOW_FIRST = ("test_toy_rlhf.py", "test_ppo.py", "test_data_templates.py", "test_distributed.py", "test_train.py",
              "test_bench_scripts.py")


def pytest_unconfigure(config):
    # The process that made the cache removes it when the session ends (the xdist workers, which
    # inherit it, end first); a cache the caller named is the caller's to keep.
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6
        config.option.loadscopereorder = False  # keep SLOW_FIRST's order
    if _fast_tier(config) and not hasattr(config, "workerinput"):  # before the workers start: they inherit it
        os.environ["LLAVA_JAX_TIER_DIR"] = tempfile.mkdtemp(prefix="llava_jax_tier_")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)  # stable: the order inside a module is kept


# --- tiers: `-m "not slow"` is the fast tier (docs/testing.md); it must touch every module ------

def _fast_tier(config) -> bool:
    return config.getoption("markexpr", "").replace(" ", "") == "notslow"


def _modules_file(config) -> str:
    """Where each process of a fast-tier session lists the llava_jax / scripts modules it ran."""
    root = os.environ["LLAVA_JAX_TIER_DIR"]
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    return os.path.join(root, f"modules_{worker}.txt")


def _ours() -> set[str]:
    import sys

    return {name for name in sys.modules if name.split(".")[0] in ("llava_jax", "scripts", "tools")}


def pytest_sessionfinish(session, exitstatus):
    """Fast tier: every module of llava_jax and every script and tool was imported in a test process by
    some test of it (a module only a subprocess runs does not count); the controller fails the
    session naming those that were not."""
    config = session.config
    if not _fast_tier(config):
        return
    with open(_modules_file(config), "a") as f:
        f.write("\n".join(sorted(_ours())) + "\n")
    if hasattr(config, "workerinput"):
        return
    import glob
    import pkgutil

    import llava_jax

    seen = set()
    for path in glob.glob(os.path.join(os.environ["LLAVA_JAX_TIER_DIR"], "modules_*.txt")):
        seen.update(open(path).read().split())
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wanted = {m.name for m in pkgutil.walk_packages(llava_jax.__path__, "llava_jax.")} - {"llava_jax.model_ckpt"}
    for folder in ("scripts", "tools"):
        wanted |= {f"{folder}.{n[:-3]}" for n in os.listdir(os.path.join(repo, folder))
                   if n.endswith(".py") and n != "__init__.py"}
    missing = sorted(wanted - seen)
    shutil.rmtree(os.environ["LLAVA_JAX_TIER_DIR"], ignore_errors=True)
    if missing:
        print(f"\nfast tier: {len(missing)} modules no fast test imports: {', '.join(missing)}")
        session.exitstatus = 1
