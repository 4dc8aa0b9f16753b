#!/usr/bin/env python
"""Bytes of one base vs one LoRA adapter vs the four PPO roles, from shapes alone.

  python scripts/adapter_memory.py [--rank 64] [--base-dtype bfloat16] [--adapter-dtype float32]

Uses `jax.eval_shape` on the 7B (ViT-L/14-224 + Vicuna-7B) and 13B (ViT-L/14-336 +
Vicuna-13B) LLaVA shapes: no weights are created. The four roles (policy, ref_policy,
value, reward) share one base; the reference policy is the base plus its own adapter.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llava_jax.models.lora import LoraConfig, init_adapter  # noqa: E402
from llava_jax.models.clip import ClipVisionConfig  # noqa: E402
from llava_jax.models.llama import LlamaConfig  # noqa: E402
from llava_jax.models.llava import LlavaConfig, init_params  # noqa: E402

SHAPES = {
    "7B": LlavaConfig(vision=ClipVisionConfig(image_size=224), text=LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32)),
    "13B": LlavaConfig(vision=ClipVisionConfig(image_size=336), text=LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)),
}


def tree_bytes(tree, dtype) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree)) * jnp.dtype(dtype).itemsize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--base-dtype", default="bfloat16")
    p.add_argument("--adapter-dtype", default="float32")
    a = p.parse_args()
    gib = 2**30
    print(f"{'model':<6}{'base GiB':>10}{'adapter GiB':>13}{'adapter params':>16}{'4 roles, 1 base':>17}"
          f"{'4 full copies':>15}")
    for name, config in SHAPES.items():
        base = jax.eval_shape(lambda c=config: init_params(c, jax.random.PRNGKey(0)))
        lora = LoraConfig(rank=a.rank, alpha=16.0)
        adapter = jax.eval_shape(lambda b=base: init_adapter(b, lora, jax.random.PRNGKey(0), a.adapter_dtype).params)
        base_b = tree_bytes(base, a.base_dtype)
        adapter_b = tree_bytes(adapter, a.adapter_dtype)
        heads_b = 2 * (config.text.hidden_size + 1) * 4
        roles = base_b + 4 * adapter_b + heads_b
        n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(adapter))
        print(f"{name:<6}{base_b / gib:>10.2f}{adapter_b / gib:>13.3f}{n_adapter / 1e6:>15.1f}M"
              f"{roles / gib:>17.2f}{4 * base_b / gib:>15.2f}")
    print(f"(base in {a.base_dtype}, adapters r={a.rank} on q,k,v,o,gate,up,down in {a.adapter_dtype}, "
          "heads float32; optimiser state not included)")


if __name__ == "__main__":
    main()
