"""No device holds more than its share: a live-array census on 8 forced CPU devices.

Each path (SFT with the whole LLM trained, LoRA SFT, PPO over two bases with the merged
export, generation) runs in one child process under `census.DeviceCensus`, on a checkpoint
whose every sharded dimension divides by 8, with the default mesh (fsdp over all 8 devices).
A device's share of the base is base/8; what a path may hold on one device on top of that is
stated per path below, plus SLACK for batches, KV caches, logits and metrics. Code that puts
a whole model on one device (the restore, a cast outside a jit, an export, the sampler's
weights) holds 8 shares there and fails.
"""
import json
import os
import subprocess
import sys

import pytest

from census import ROOT, SCENARIOS, census_config

# Whole pipelines (their fixtures train a toy world): the full suite only (docs/testing.md).
pytestmark = pytest.mark.slow

SLACK = 2 * 2**20  # bytes: batches, the KV cache, logits, metrics, RNG keys
DEVICES = 8


def _bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _budgets(base_bytes: int) -> dict[str, int]:
    """Bytes one device may hold at most, per path."""
    import jax

    from llava_jax.models import lora as lora_lib
    from llava_jax.models.weights import abstract_params

    base = abstract_params(census_config())
    share = base_bytes // DEVICES
    trained = _bytes({"projector": base["projector"], "llm": base["llm"]})  # float32 already
    adapter = _bytes(jax.eval_shape(lambda: lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=4, alpha=8.0),
                                                                   jax.random.PRNGKey(0)).params))
    return {
        # the frozen tower, then (at export) the trained part cast back, beside the float32
        # params and Adam's two moments of the trained part, all sharded
        "sft_full": share + 3 * trained // DEVICES + SLACK,
        # the base; the adapter's params and moments counted whole (its `b` factors replicate)
        "sft_lora": share + 3 * adapter + SLACK,
        # two bases and the merged policy of the export; adapters (policy, ref, value, reward)
        # and the value adapter's moments counted whole
        "ppo_two_bases": 3 * share + 6 * adapter + SLACK,
        "generate": share + SLACK,
    }


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> list[dict]:
    root = str(tmp_path_factory.mktemp("census"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "census.py"), root, *SCENARIOS], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"scenario"')]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_device_holds_more_than_its_share(census, scenario):
    (run,) = [r for r in census if r["scenario"] == scenario]
    budget = _budgets(run["base_bytes"])[scenario]
    assert run["samples"] > 10
    worst = max(run["peak"], key=run["peak"].get)
    assert run["peak"][worst] <= budget, (
        f"{scenario}: {worst} held {run['peak'][worst] / run['base_bytes']:.2f}x the base at once (budget "
        f"{budget / run['base_bytes']:.2f}x); heaviest arrays then: {run['heaviest'][worst]}")
    # the census saw the model, on every device: together they held at least one whole base
    assert len(run["peak"]) == DEVICES and sum(run["peak"].values()) >= run["base_bytes"]
