#!/usr/bin/env python
"""Decode throughput of our KV-cache sampler vs HF `generate` on the same weights and shapes.

  python scripts/bench_generate.py [--layers 8 --hidden 512 --batch 8 --new-tokens 128] [--dtype float32]
                                   [--cpu-shapes auto|on|off|both]

Builds a random llava-hf model (CPU-sized by default: 8 layers, hidden 512), imports it with
the real `load_hf`, and times greedy decoding of `--new-tokens` tokens (no early stop) for a
left-padded batch with images, in both implementations, in the same run (alternating,
`--repeats` times each). Prints a table of medians. `--cpu-shapes` is settings'
`model.cpu_shapes` (auto: on on a CPU); `both` times ours with it on and off, taking turns.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def build_hf(layers: int, hidden: int, vocab: int, image_size: int, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=image_size, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                    num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                                    vocab_size=vocab, max_position_embeddings=2048)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_index=vocab - 1)
    return transformers.LlavaForConditionalGeneration(config).eval()


CPU_SHAPES_CHOICES = ("auto", "on", "off", "both")


def cpu_shapes_variants(choice: str) -> list[tuple[str, bool]]:
    """(name suffix, cpu_shapes) of each variant of ours that `--cpu-shapes` asks for."""
    from llava_jax.settings import cpu_shapes_on

    if choice == "both":
        return [(" cpu_shapes=on", True), (" cpu_shapes=off", False)]
    return [("", cpu_shapes_on(choice, jax.default_backend()))]


def make_prompts(a: argparse.Namespace, config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, pixels): `a.batch` prompts of one token + image placeholders + `a.prompt_text`
    random tokens + 3, left-padded by 0-3 tokens (row b by b % 4), and random images."""
    n_img = config.num_image_tokens
    seq = 1 + n_img + a.prompt_text + 3
    rng = np.random.RandomState(0)
    ids = rng.randint(3, a.vocab - 1, size=(a.batch, seq))
    mask = np.ones_like(ids)
    for b in range(a.batch):
        pad = b % 4
        ids[b, :pad], mask[b, :pad] = 0, 0
        ids[b, pad + 1:pad + 1 + n_img] = config.image_token_index
    pixels = rng.randn(a.batch, a.image_size, a.image_size, 3).astype(np.float32)
    return ids, mask, pixels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-text", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each implementation (alternating)")
    p.add_argument("--skip-hf", action="store_true", help="time ours only (e.g. on a GPU without torch)")
    p.add_argument("--cpu-shapes", default="auto", choices=CPU_SHAPES_CHOICES,
                   help="model.cpu_shapes (auto: on on a CPU); both: ours with it on and off, taking turns")
    a = p.parse_args()

    import torch

    from llava_jax.convert import load_hf
    from llava_jax.generate.sampling import SamplingConfig, generate_fn

    torch.set_num_threads(os.cpu_count() or 1)
    hf = build_hf(a.layers, a.hidden, a.vocab, a.image_size)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        config, base = load_hf(d)
    config = config.with_runtime(dtype=a.dtype, param_dtype=a.dtype)
    base = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, a.dtype), base)

    n_img = config.num_image_tokens
    ids, mask, pixels = make_prompts(a, config)
    seq = ids.shape[1]

    # The KV cache in the model dtype: a bfloat16 cache under float32 compute would convert
    # the whole cache every step (slow on CPU), and HF keeps its cache in the model dtype too.
    sampling = SamplingConfig.greedy(max_new_tokens=a.new_tokens, eos_id=None, cache_dtype=a.dtype)
    runners, compile_s, outs = {}, {}, {}
    for suffix, on in cpu_shapes_variants(a.cpu_shapes):
        run = generate_fn(config.with_runtime(cpu_shapes=on), sampling)
        start = time.perf_counter()
        outs[suffix] = jax.block_until_ready(run(base, None, ids, mask, pixels, jax.random.PRNGKey(0)))
        compile_s[suffix] = time.perf_counter() - start
        runners["ours" + suffix] = (lambda run=run: jax.block_until_ready(
            run(base, None, ids, mask, pixels, jax.random.PRNGKey(0))))
    if not a.skip_hf:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
        hf = hf.to(torch_dtype)
        kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2).to(torch_dtype), pad_token_id=0,
                      eos_token_id=None, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)

        def run_hf():
            with torch.no_grad():
                return hf.generate(**kwargs)

        with torch.no_grad():
            hf.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        runners["hf"] = run_hf
    # Both sides run the same number of times, alternating, so a change in the machine's load
    # (other jobs share the CPU) hits both alike; the table gives medians.
    times: dict[str, list[float]] = {name: [] for name in runners}
    results = {}
    for _ in range(a.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    tokens = a.batch * a.new_tokens
    rows = [(f"llava_jax{suffix}", times["ours" + suffix], f"compile {compile_s[suffix]:.1f}s")
            for suffix in compile_s]
    first = np.asarray(next(iter(outs.values()))["tokens"])
    if len(outs) > 1:
        same = float(np.mean([np.mean(np.asarray(o["tokens"]) == first) for o in outs.values()]))
        rows[-1] = (*rows[-1][:2], rows[-1][2] + f"; same greedy tokens as {rows[0][0]}: {same:.1%}")
    if "hf" in runners:
        ref = results["hf"][:, seq:].numpy()
        same = float((first == ref).mean())
        rows.append(("HF transformers generate", times["hf"], f"same greedy tokens: {same:.1%}"))
    print(f"LLaVA {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, batch {a.batch}, prompt {seq} tokens "
          f"({n_img} image), {a.new_tokens} new tokens, {a.dtype}, {jax.devices()[0].platform}, "
          f"median of {a.repeats} runs each")
    print(f"{'implementation':<28}{'seconds':>9}{'tokens/s':>11}{'best s':>9}  note")
    for name, secs, note in rows:
        med = float(np.median(secs))
        print(f"{name:<28}{med:>9.2f}{tokens / med:>11.1f}{min(secs):>9.2f}  {note}")
    for other in rows[1:]:
        ratios = [h / o for o, h in zip(rows[0][1], other[1])]
        print(f"{rows[0][0]} vs {other[0]}: {np.median(other[1]) / np.median(rows[0][1]):.2f}x faster (medians); "
              f"per round {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
