"""A per-device census of live jax arrays, and the runs it watches (tests/test_census.py).

A CPU cannot show a whole model landing on one accelerator: its "devices" all share host
memory. What it can show is where the arrays are: `DeviceCensus` samples `jax.live_arrays()`
every few milliseconds from a thread and keeps, per device, the most bytes it held at once.
Run as a script, this file builds a checkpoint whose every sharded dimension divides by 8 and
runs one path on 8 forced CPU devices under the census, printing one JSON line:

  python tests/census.py ROOT [sft_full|sft_lora|ppo_two_bases|generate ...]
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCENARIOS = ("sft_full", "sft_lora", "ppo_two_bases", "generate")


class DeviceCensus:
    """Peak bytes of live jax arrays per device (shard bytes on the devices holding them)."""

    def __init__(self, interval_s: float = 0.003):
        self.interval_s = interval_s
        self.peak: dict[str, int] = defaultdict(int)
        self.heaviest: dict[str, list[str]] = {}  # per device: its largest arrays at its peak
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import jax

        held: dict[str, int] = defaultdict(int)
        arrays: dict[str, list[tuple[int, str]]] = defaultdict(list)
        seen: set[tuple[str, int]] = set()  # a buffer once: a global array's shards alias its per-device arrays
        for array in jax.live_arrays():
            try:
                if array.is_deleted():
                    continue
                what = f"{array.dtype}{list(array.shape)} {type(array.sharding).__name__}"
                for shard in array.addressable_shards:
                    device, data = str(shard.device), shard.data
                    key = (device, data.unsafe_buffer_pointer())
                    if key in seen:
                        continue
                    seen.add(key)
                    held[device] += data.nbytes
                    arrays[device].append((data.nbytes, what))
            except Exception:  # deleted or donated while we looked: not live any more
                continue
        for device, nbytes in held.items():
            if nbytes > self.peak[device]:
                self.peak[device] = nbytes
                self.heaviest[device] = [w for _, w in sorted(arrays[device], reverse=True)[:4]]
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> "DeviceCensus":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def census_config() -> Any:
    """The tiny LLaVA made wider so the weights dominate what is live (~23 MB in float32),
    every dimension the fsdp axis shards divisible by 8."""
    from llava_jax.models.llava import tiny_config

    small = tiny_config()
    return dataclasses.replace(
        small, vision=dataclasses.replace(small.vision, hidden_size=128, intermediate_size=256, num_layers=2),
        text=dataclasses.replace(small.text, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=4))


def make_checkpoint(path: str, seed: int) -> int:
    """A census-sized checkpoint at `path`; returns its bytes."""
    import jax
    import numpy as np

    from llava_jax.models.weights import save_checkpoint
    from llava_jax.models.llava import init_params

    config = census_config()
    with jax.default_device(jax.devices("cpu")[0]):
        params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(seed)))
    if not os.path.isdir(path):
        save_checkpoint(path, config, params)
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def _train_config(stage_config: Any, workdir: str, ckpt: str, **overrides: Any) -> Any:
    cfg = stage_config()
    cfg.update_from_flattened_dict({"requires": "", "workdir": workdir, "model.init": ckpt,
                                    "log.tensorboard": False, "data.workers": 0, "checkpoint.every": 100,
                                    "data.num_buckets": 1, "train.max_steps": 1, **overrides})
    return cfg


def _reward_adapter(path: str) -> None:
    import jax

    from llava_jax.models import heads, lora as lora_lib
    from llava_jax.models.weights import abstract_params, write_adapter_dir

    if os.path.isdir(path):
        return
    config = census_config()
    adapter = lora_lib.init_adapter(abstract_params(config), lora_lib.LoraConfig(rank=4, alpha=8.0),
                                    jax.random.PRNGKey(6))
    head = heads.init_head("reward", config.text.hidden_size, jax.random.PRNGKey(7))
    write_adapter_dir(path, jax.device_get(adapter), jax.device_get(head), "reward")


def _questions(path: str, n: int) -> str:
    with open(os.path.join(ROOT, "data", "toy", "eval", "pope.jsonl")) as f:
        lines = [line for line in f if line.strip()][:n]
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def run(scenario: str, root: str) -> dict:
    """Runs one path under the census; its per-device peaks beside the base's bytes."""
    sys.path[:0] = [ROOT, TESTS]
    from ppo_helpers import ppo_config, run_config

    from configs.tiny_sft import get_config as tiny_sft

    os.chdir(ROOT)
    base_bytes = make_checkpoint(os.path.join(root, "base"), 0)
    work = os.path.join(root, scenario)
    if scenario == "ppo_two_bases":
        make_checkpoint(os.path.join(root, "reward_base"), 1)
        _reward_adapter(os.path.join(root, "reward_adapter"))
    with DeviceCensus() as census:
        if scenario in ("sft_full", "sft_lora"):
            trainable = "projector+llm" if scenario == "sft_full" else "lora"
            run_config(_train_config(tiny_sft, work, os.path.join(root, "base"),
                                    **{"train.trainable": trainable, "train.lora_rank": 4}))
        elif scenario == "ppo_two_bases":
            cfg = ppo_config(work, os.path.join(root, "base"), os.path.join(root, "reward_adapter"), steps=1,
                             mesh=(1, -1, 1))
            cfg.update_from_flattened_dict({"ppo.reward_base": os.path.join(root, "reward_base"),
                                            "ppo.export_merged": True, "data.tokenizer": "data/toy/tokenizer"})
            run_config(cfg)
        else:
            from scripts.generate import main as generate

            generate(["--ckpt", os.path.join(root, "base"), "--tokenizer", "data/toy/tokenizer", "--questions",
                      _questions(os.path.join(root, "questions.jsonl"), 16), "--image-folder", "data/toy/images",
                      "--format", "pope", "--out", os.path.join(work, "answers.jsonl"), "--max-new-tokens", "4"])
    return {"scenario": scenario, "base_bytes": base_bytes, "peak": dict(census.peak),
            "heaviest": census.heaviest, "samples": census.samples}


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for name in sys.argv[2:] or SCENARIOS:
        print(json.dumps(run(name, sys.argv[1])), flush=True)
        gc.collect()  # the last run's arrays are not the next one's
