#!/usr/bin/env python
"""One command for a GPU: what a 7B-shaped LLaVA does on one H100 / H200, in under 8 minutes.

  python scripts/bench_gpu.py                      # one H100 / H200
  python scripts/bench_gpu.py --tiny               # tiny shapes, a check that it runs (the default without a GPU)
  python scripts/bench_gpu.py --sections decode --decode-batch 32

(a) train: a LoRA SFT step (r=64 on q,k,v,o,gate,up,down; AdamW, clipping) of the 7B LLaVA
    (CLIP ViT-L/14-224, 256 image tokens; Vicuna-7B shape, vocab 32000) in bfloat16 at
    --seq 2048 tokens per item: tokens/s, achieved TFLOP/s and MFU (model FLOPs from
    metrics.transformer_train_flops, over the chip's dense bf16 peak, metrics.peak_flops).
(b) decode: our KV-cache sampler at batch 64, 512 new tokens (no early stop) on the same
    model: tokens/s of the decode steps (the prefill, timed by a 1-token run, taken off) and
    the fraction of the HBM-bandwidth bound: per step the LLM weights plus the valid KV
    cache (prompt + tokens so far) must be read once; bound = those bytes / the device's
    measured bandwidth (the best of a few large on-device read+write passes).
(c) ppo: one PPO step (our library pieces: scripts/bench_ppo_world.py) on a 7B-shaped policy
    with --ppo-layers of its 32 layers (printed) to fit the time, four roles over one base:
    seconds per phase (sampling, scoring, update). The first step compiles; the table shows
    the next one.

Random weights; every section prints its compile / warm-up time apart; a section that fails
(e.g. out of memory) prints its error and the others still run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # one jax process: most of the HBM

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from llava_jax.models.llava import LlavaConfig

SECTIONS = ("train", "decode", "ppo")
# Full and tiny defaults: seq/batch of the train step, decode batch/new tokens/text tokens, PPO shapes.
FULL = dict(seq=2048, batch=4, steps=5, decode_batch=64, new_tokens=512, text_len=32, ppo_layers=8,
            rollout_batch=32, step_batch=16, response_len=128, lora_rank=64, bandwidth_bytes=4 << 30)
TINY = dict(seq=64, batch=2, steps=2, decode_batch=4, new_tokens=16, text_len=16, ppo_layers=None,
            rollout_batch=4, step_batch=2, response_len=8, lora_rank=8, bandwidth_bytes=64 << 20)


@dataclasses.dataclass
class Row:
    name: str
    shape: str
    result: str
    bound: str
    warmup_s: float


def measured_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes/s of the best of `reps` passes of y = x + 1 over an `nbytes` float32 array (read + write)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    add = jax.jit(lambda v: v + 1.0)
    jax.block_until_ready(add(x))
    best = float("inf")
    for _ in range(reps):
        begin = time.perf_counter()
        jax.block_until_ready(add(x))
        best = min(best, time.perf_counter() - begin)
    return 2 * x.size * 4 / best


def model(tiny: bool, dtype: str, remat: str, attention: str) -> tuple[LlavaConfig, dict]:
    """(config, base) of the 7B-shaped LLaVA (tiny: tiny_config) with random weights in `dtype`."""
    from llava_jax.models.llava import init_params
    from scripts.bench_ppo_world import build_config

    config = build_config("tiny", None) if tiny else build_config("7b", None, vocab=32000)
    config = config.with_runtime(dtype=dtype, param_dtype=dtype)
    base = init_params(config, jax.random.PRNGKey(0))  # plain XLA attention here: the knobs are the sections'
    return config.with_runtime(remat_policy=remat, attention=attention), base


def secs(x: float) -> str:
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def llm_shape(config: LlavaConfig) -> str:
    t = config.text
    return f"{t.num_layers} layers x {t.hidden_size}, vocab {t.vocab_size}, {config.num_image_tokens} image tokens"


def bench_train(config: LlavaConfig, base: dict, a: argparse.Namespace, peak: float | None) -> Row:
    from scripts.bench_train import make_batch, ours_step_fn, step_flops

    batch = make_batch(a.batch, a.seq, config.text.vocab_size, config.num_image_tokens, config.image_token_index,
                       config.vision.image_size)
    step = ours_step_fn("lora", config, base, batch, a.lora_rank, 16.0, a.dtype, a.steps + 1)
    begin = time.perf_counter()
    step()
    warm = time.perf_counter() - begin
    times = []
    for _ in range(a.steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    step_s = statistics.median(times)
    flops = step_flops("lora", config, base, a.batch, a.seq)
    mfu = (f"MFU {flops / step_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak
           else "MFU n/a (no peak for this device)")
    t = config.text
    return Row("(a) LoRA SFT step", f"{llm_shape(config)}; batch {a.batch} x seq {a.seq}, {a.dtype}, LoRA r="
               f"{a.lora_rank}, remat {t.remat_policy}, attention {t.attention}",
               f"{secs(step_s)}/step (median of {a.steps}), {a.batch * a.seq / step_s:,.0f} tokens/s, "
               f"{flops / step_s / 1e12:.3g} TFLOP/s", mfu, warm)


def decode_bytes(config: LlavaConfig, base: dict, batch: int, prompt: int, new_tokens: int,
                 cache_bytes: int) -> float:
    """Bytes every decode step must read, summed over the steps: the LLM weights (not the
    embedding table: a lookup reads B rows) and the valid KV cache (prompt + tokens so far)."""
    llm = base["llm"]
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(llm))
    weights -= sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(llm["embed_tokens"]))
    t = config.text
    per_position = 2 * t.num_layers * batch * t.num_kv_heads * t.head_dim * cache_bytes
    context = sum(prompt + i for i in range(new_tokens))
    return float(weights) * new_tokens + float(per_position) * context


def bench_decode(config: LlavaConfig, base: dict, a: argparse.Namespace, bandwidth: float) -> Row:
    from llava_jax.generate.sampling import SamplingConfig, generate_fn
    from scripts.bench_ppo_world import make_prompts

    prompts = make_prompts(config, a.decode_batch, a.text_len)
    ids, mask, pixels = (jnp.asarray(prompts[k]) for k in ("query_ids", "query_mask", "pixel_values"))
    pixels = pixels.astype(a.dtype)

    def timed(new_tokens: int) -> tuple[float, float]:
        sampling = SamplingConfig.greedy(max_new_tokens=new_tokens, eos_id=None, cache_dtype=a.dtype)
        run = generate_fn(config, sampling)
        begin = time.perf_counter()
        jax.block_until_ready(run(base, None, ids, mask, pixels, jax.random.PRNGKey(0)))
        warm = time.perf_counter() - begin
        times = []
        for _ in range(2):
            begin = time.perf_counter()
            jax.block_until_ready(run(base, None, ids, mask, pixels, jax.random.PRNGKey(0)))
            times.append(time.perf_counter() - begin)
        return min(times), warm

    total, warm = timed(a.new_tokens)
    prefill, warm1 = timed(1)  # the prefill and one step: what the decode steps are not
    decode = max(total - prefill, 1e-9)
    steps = a.new_tokens - 1
    need = decode_bytes(config, base, a.decode_batch, ids.shape[1] + 1, steps, jnp.dtype(a.dtype).itemsize)
    bound = need / bandwidth
    return Row("(b) decode", f"{llm_shape(config)}; batch {a.decode_batch}, prompt {ids.shape[1]} tokens, "
               f"{a.new_tokens} new tokens (greedy, no stop), {a.dtype} weights and KV cache",
               f"{a.decode_batch * steps / decode:,.0f} tokens/s over the decode steps ({secs(decode)}; whole call "
               f"{secs(total)} with prefill {secs(prefill)})",
               f"{bound / decode:.0%} of the HBM bound ({need / steps / 1e9:.3g} GB/step at {bandwidth / 1e12:.3g} "
               f"TB/s measured){' (tiny: cache-resident, not meaningful)' if a.tiny else ''}", warm + warm1)


def bench_ppo_step(config: LlavaConfig, base: dict, a: argparse.Namespace) -> Row:
    from scripts.bench_ppo_world import PHASES, OursPPO, cut_ids, make_prompts, make_roles, minibatch_orders

    total_layers = config.text.num_layers
    layers = min(a.ppo_layers or total_layers, total_layers)
    if layers < total_layers:  # the first layers of the stacked tree: a 7B layer shape, fewer of them
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=layers))
        llm = {**base["llm"], "layers": jax.tree_util.tree_map(lambda x: x[:layers], base["llm"]["layers"])}
        base = {**base, "llm": llm}
    config = config.with_runtime(remat_policy="none")
    base, adapters, head_of = make_roles(config, a.lora_rank, base=base)
    rating = np.random.RandomState(1).randint(3, config.text.vocab_size - 1, size=48).astype(np.int32)
    ours = OursPPO(config, base, adapters, head_of, response_len=a.response_len, dtype=a.dtype, rating_ids=rating,
                   cut_ids=cut_ids("", config))
    prompts = make_prompts(config, a.rollout_batch, a.text_len)
    epochs = ours.cfg.ppo.ppo_epochs
    begin = time.perf_counter()
    ours.step(prompts, 0, minibatch_orders(0, 0, epochs, a.rollout_batch), a.step_batch)
    warm = time.perf_counter() - begin
    times = ours.step(prompts, 1, minibatch_orders(0, 1, epochs, a.rollout_batch), a.step_batch)[0]
    total = sum(times.values())
    split = ", ".join(f"{k} {secs(times[k])} ({times[k] / total:.0%})" for k in PHASES)
    updates = epochs * (a.rollout_batch // a.step_batch)
    return Row("(c) PPO step", f"{llm_shape(config)} ({layers} of {total_layers} layers); rollout {a.rollout_batch}, "
               f"{updates} updates of {a.step_batch}, response {a.response_len}, {a.dtype}, LoRA r={a.lora_rank}",
               f"{secs(total)}: {split}", "", warm)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the default when the device is not a GPU)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="dots_no_batch", help="train step: none | full | dots | dots_no_batch")
    p.add_argument("--attention", default="flash", help="train step: flash (cuDNN; xla if it fails) | xla")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {value} ({TINY[key]} with --tiny)")
    a = p.parse_args(argv)
    a.tiny = a.tiny or jax.devices()[0].platform != "gpu"
    for key, value in (TINY if a.tiny else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.tiny:
        a.dtype, a.attention = "float32", "xla"  # bf16 dots crawl on XLA:CPU
    unknown = set(a.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; expected any of {SECTIONS}")
    return a


def run_section(name: str, fn: Callable[..., Row], *args: Any) -> Row:
    begin = time.perf_counter()
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    try:
        row = fn(*args)
    except Exception as e:  # noqa: BLE001  one failing section must not cost the others
        traceback.print_exc()
        row = Row(name, "", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", "", 0.0)
    print(f"[{name}] done in {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    from llava_jax.train.metrics import peak_flops

    start = time.perf_counter()
    a = parse(argv)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    sections = a.sections.split(",")
    bandwidth = measured_bandwidth(a.bandwidth_bytes)
    config, base = model(a.tiny, a.dtype, a.remat, a.attention)
    rows = []
    if "train" in sections:
        row = run_section("train", bench_train, config, base, a, peak)
        if row.result.startswith("FAILED") and a.attention != "xla" and "RESOURCE_EXHAUSTED" not in row.result:
            print(f"[train] attention {a.attention} failed; again with attention xla", file=sys.stderr, flush=True)
            row = run_section("train", bench_train, config.with_runtime(attention="xla"), base, a, peak)
        rows.append(row)
    if "decode" in sections:
        rows.append(run_section("decode", bench_decode, config.with_runtime(attention="xla"), base, a, bandwidth))
    if "ppo" in sections:
        rows.append(run_section("ppo", bench_ppo_step, config.with_runtime(attention="xla"), base, a))
    print(f"\n{device.device_kind} ({device.platform}){' [tiny shapes]' if a.tiny else ''}: dense bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}, measured copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    print("| benchmark | shape | result | against the bound | compile + first run s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.shape} | {r.result} | {r.bound} | {r.warmup_s:.0f} |")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
