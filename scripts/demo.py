#!/usr/bin/env python
"""Conversion + forward demo on an embedded tiny LLaVA (no downloads, CPU is enough).

  python scripts/demo.py [--out runs/demo]

Builds a random tiny LLaVA, exports it to the llava-hf layout, imports it back (the same
code path `tools/convert_hf.py` uses for real checkpoints), checks every tensor survived
bit for bit, saves/loads our orbax checkpoint, and runs a jitted forward on a left-padded
batch that mixes an image item with a text-only item.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.convert import export_hf, load_hf  # noqa: E402
from llava_jax.models.weights import load_checkpoint, save_checkpoint  # noqa: E402
from llava_jax.models.llava import Llava, init_params, tiny_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()

    config = tiny_config()
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"tiny LLaVA: {n_params:,} params, {config.num_image_tokens} image tokens, "
          f"projector={config.projector_type}")

    hf_dir, ckpt_dir = os.path.join(args.out, "hf"), os.path.join(args.out, "ckpt")
    export_hf(config, params, hf_dir, overwrite=True)
    config2, params2 = load_hf(hf_dir)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                     jax.tree_util.tree_leaves(params2)))
    print(f"export -> {hf_dir} -> import: config equal {config2 == config}, tensors bit-identical {same}")
    save_checkpoint(ckpt_dir, config2, params2, overwrite=True)
    config3, params3 = load_checkpoint(ckpt_dir)
    print(f"orbax checkpoint {ckpt_dir} reloaded: {len(jax.tree_util.tree_leaves(params3))} arrays")

    n_img = config.num_image_tokens
    seq = n_img + 12
    ids = np.random.RandomState(0).randint(3, config.image_token_index, size=(2, seq))
    ids[0, 1:1 + n_img] = config.image_token_index  # item 0: an image; item 1: text, left-padded
    mask = np.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    size = config.vision.image_size
    pixels = np.random.RandomState(1).randn(2, size, size, 3).astype(np.float32)
    forward = jax.jit(lambda p, i, x, m: Llava(config3).apply({"params": p}, i, x, m))
    start = time.perf_counter()
    logits = forward(params3, ids, pixels, mask).block_until_ready()
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(params3, ids, pixels, mask).block_until_ready()
    print(f"forward: logits {logits.shape} {logits.dtype}, compile+run {compiled:.2f}s, "
          f"run {1e3 * (time.perf_counter() - start):.1f}ms, next tokens {jnp.argmax(logits[:, -1], -1).tolist()}")
    if not (same and config2 == config and bool(jnp.all(jnp.isfinite(logits)))):
        sys.exit("demo failed: round trip or forward is wrong")


if __name__ == "__main__":
    main()
