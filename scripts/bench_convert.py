#!/usr/bin/env python
"""Peak host memory and time of `tools/convert_hf.py import` / `export` on a synthetic model.

  python scripts/bench_convert.py [--hidden 2048 --layers 12 --vocab 32000] [--work /tmp/bench_convert]

Writes a random llava-hf checkpoint of the requested LLaMA width/depth in float16 (as
released checkpoints are), then runs import (to bfloat16 and float32) and export, each in
a fresh process, and prints a table of peak RSS against the checkpoint size. The import
target is "about 2x the model size at most" (streaming, tensor by tensor).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# VmHWM (not ru_maxrss, which a child inherits from its forking parent) is the peak RSS.
RUNNER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("PEAK_RSS_KB", hwm, file=sys.stderr)
"""


def make_checkpoint(out: str, hidden: int, layers: int, vocab: int) -> int:
    import jax
    import numpy as np

    from llava_jax.convert import export_hf
    from llava_jax.models.llava import LlavaConfig, init_params, tiny_config
    from llava_jax.models.llama import LlamaConfig

    base = tiny_config()
    config = LlavaConfig(vision=base.vision, projector_type="linear", image_token_index=vocab - 1,
                         text=LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                          num_layers=layers, num_heads=hidden // 128, num_kv_heads=hidden // 128))
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32).astype(np.float16), shapes)
    export_hf(config, params, out, max_shard_bytes=2 * 10**9, overwrite=True)
    return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))


def run(args: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, os.path.join(ROOT, "tools/convert_hf.py"), *args],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    peak_kb = int(proc.stderr.split("PEAK_RSS_KB")[-1].split()[0])
    return peak_kb * 1024, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--work", default="/tmp/bench_convert")
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    hf = os.path.join(a.work, "hf")
    size = make_checkpoint(hf, a.hidden, a.layers, a.vocab)
    gib = 2**30
    print(f"synthetic llava-hf checkpoint: {size / gib:.2f} GiB float16 ({size // 2 / 1e6:.0f}M params)")
    print(f"{'step':<34}{'peak RSS GiB':>14}{'x ckpt size':>13}{'seconds':>10}")
    rows = [("import -> bfloat16", ["import", "--hf", hf, "--out", os.path.join(a.work, "bf16"), "--dtype", "bfloat16"]),
            ("import -> float32", ["import", "--hf", hf, "--out", os.path.join(a.work, "f32")]),
            ("export bfloat16 ckpt -> llava-hf", ["export", "--ckpt", os.path.join(a.work, "bf16"),
                                                  "--out", os.path.join(a.work, "exp")])]
    for name, cmd in rows:
        peak, secs = run(cmd)
        print(f"{name:<34}{peak / gib:>14.2f}{peak / size:>13.2f}{secs:>10.1f}")


if __name__ == "__main__":
    main()
