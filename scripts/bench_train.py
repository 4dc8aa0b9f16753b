#!/usr/bin/env python
"""Training-step throughput (tokens/s, MFU) of our jitted `sft_step` vs HF PyTorch on the same weights.

  python scripts/bench_train.py [--mode both|full|lora] [--layers 8 --hidden 512 --batch 4 --seq 512]
                                [--lora-rank 16] [--steps 5] [--dtype float32] [--skip-hf] [--peak]
                                [--cpu-shapes auto|on|off|both]

Builds bench_generate's random llava-hf model (LLaMA 8 layers, hidden 512, vocab 32000; CLIP 4
layers, 112 px -> 64 image tokens), imports it with the real `load_hf`, and times one training step
(forward + backward + clipped AdamW) on `--seq` tokens per item (image placeholders, then a 32-token
prompt masked out of the labels) in both implementations, in the same run. full: projector + LLM
train, vision frozen; lora: adapters on q,k,v,o,gate,up,down of the LLM (peft on HF). Median of
`--steps` steps after 2 warm-up, ours and HF alternating step by step (each then sees the same
share of a shared machine's load; the fastest step is printed too). MFU: model FLOPs
(`transformer_train_flops`, vision forward only) over the dense bf16 peak; "n/a" on CPU. With
bfloat16 our trainable leaves stay float32 (as in the trainer), HF trains in pure bfloat16. The
footer prints both step-0 losses (same weights: equal). `--cpu-shapes` is settings'
`model.cpu_shapes` (auto: on on a CPU); `both` times ours with it on and off, taking turns.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scripts.bench_generate import CPU_SHAPES_CHOICES, cpu_shapes_variants  # noqa: E402

PROMPT = 32  # text tokens after the image whose labels are masked (the "question")
WARMUP = 2
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_LORA_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LR = 2e-5


def make_batch(batch: int, seq: int, vocab: int, n_img: int, image_token: int, image_size: int) -> dict:
    if seq < n_img + PROMPT + 2:
        raise SystemExit(f"--seq {seq} is too short: {n_img} image tokens + {PROMPT} prompt + 2 at least")
    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab - 1, size=(batch, seq)).astype(np.int32)
    ids[:, :n_img] = image_token
    labels = ids.copy()
    labels[:, :n_img + PROMPT] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
            "valid": np.ones((batch,), np.int32),
            "pixel_values": rng.randn(batch, image_size, image_size, 3).astype(np.float32)}


def time_steps(steps_by_name: dict, steps: int) -> dict[str, tuple[float, float, float, float]]:
    """name -> (median s/step over `steps` after WARMUP, fastest step, step-0 loss, seconds of the first step).

    The implementations take turns step by step: on a shared machine load comes and goes,
    and timing one after the other would hand each a different share of it."""
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    losses: dict[str, float] = {}
    for name, step in steps_by_name.items():
        for _ in range(WARMUP):
            start = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - start)
            losses.setdefault(name, loss)
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t[WARMUP:]), min(t[WARMUP:]), losses[name], t[0]) for name, t in times.items()}


def ours_step_fn(mode: str, config, base: dict, batch: dict, rank: int, alpha: float, dtype: str, total: int):
    """A closure running one donated, jitted `sft_step` (trainable tree as trainer.split_trainable)."""
    from llava_jax.models import lora as lora_lib
    from llava_jax.models import trainable
    from llava_jax.train.optim import OptimConfig, make_optimizer
    from llava_jax.train.sft import sft_step
    from llava_jax.train.state import ModelSpec, create_state

    rng = jax.random.PRNGKey(0)
    train_base, frozen = trainable.split_base(base, ["projector", "llm"] if mode == "full" else [])
    params: dict = {}
    if train_base:
        params["base"] = trainable.cast_tree(train_base, jnp.float32)
    spec = ModelSpec(config)
    if mode == "lora":
        lcfg = lora_lib.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=LORA_TARGETS)
        adapter = lora_lib.init_adapter(base, lcfg, jax.random.fold_in(rng, 1))
        params["adapter"] = trainable.cast_tree(adapter.params, jnp.float32)
        spec = ModelSpec(config, adapter.config)
    # Own buffers: a same-dtype cast may alias `base`, which donation would then delete.
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    optimizer, schedule = make_optimizer(OptimConfig(learning_rate=LR, schedule="constant", warmup_ratio=0.0), total)
    holder = {"state": create_state(params, optimizer, rng)}
    step_fn = jax.jit(functools.partial(sft_step, spec, optimizer, schedule), donate_argnums=(0,))
    jbatch = {k: jnp.asarray(v, dtype if k == "pixel_values" else None) for k, v in batch.items()}

    def step() -> float:
        holder["state"], metrics = step_fn(holder["state"], frozen, jbatch)
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])
    return step


def hf_step_fn(mode: str, hf, init_state: dict, batch: dict, rank: int, alpha: float, device):
    """A closure running forward + backward + clipped AdamW on the HF model (peft for LoRA)."""
    import torch

    hf.load_state_dict(init_state)  # every mode starts from the imported weights
    if mode == "full":
        model = hf.requires_grad_(True)
        hf.model.vision_tower.requires_grad_(False)
    else:
        import peft

        model = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                          target_modules=HF_LORA_REGEX))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    dtype = next(hf.parameters()).dtype
    inputs = {k: torch.tensor(batch[k], dtype=torch.long, device=device)
              for k in ("input_ids", "labels", "attention_mask")}
    inputs["pixel_values"] = torch.tensor(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous().to(device, dtype)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.item())
    return model, step


def matmul_peak(torch_device=None, size: int = 4096, reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` FLOP/s of one [size, size] x [size, size] float32 matmul in jax (and torch):
    the ceiling the GF/s column is measured against (on CPU, where no peak table applies)."""
    x = jnp.asarray(np.random.RandomState(0).randn(size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    runs = {"jax": lambda: jax.block_until_ready(matmul(x))}
    if torch_device is not None:
        import torch

        t = torch.tensor(np.asarray(x), device=torch_device)
        sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
        runs["torch"] = lambda: (t @ t, sync())
    peaks = {}
    for name, run in runs.items():
        run()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * size ** 3 / best
    return peaks


def step_flops(mode: str, config, base: dict, batch: int, seq: int) -> float:
    """Model FLOPs of one step: LLM (train or LoRA), projector on image tokens, frozen vision forward."""
    from llava_jax.train.metrics import transformer_train_flops

    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    llm = size(base["llm"]) - size(base["llm"]["embed_tokens"])  # a lookup is no matmul
    lora, text = mode == "lora", config.text
    flops = transformer_train_flops(llm, batch * seq, text.num_layers, text.hidden_size, seq, lora=lora)
    flops += (2 if lora else 6) * size(base["projector"]) * batch * config.num_image_tokens
    flops += 2 * size(base["vision"]) * batch * (config.vision.num_patches + 1)
    return flops


def build_models(a: argparse.Namespace) -> tuple:
    """(config, base, hf, torch device, HF initial state): bench_generate's random llava-hf model
    imported with the real `load_hf` (hf None with --skip-hf: our own init at the same shapes)."""
    from llava_jax.convert import load_hf

    hf = torch_device = init_state = None
    if not a.skip_hf:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        from scripts.bench_generate import build_hf  # the same random llava-hf model

        hf = build_hf(a.layers, a.hidden, a.vocab, a.image_size)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            config, base = load_hf(d)
        torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hf = hf.to(torch_device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype])
        init_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    else:  # no torch needed: the same shapes, our own random init
        from llava_jax.models import clip, llama, llava
        config = llava.LlavaConfig(
            vision=clip.ClipVisionConfig(image_size=a.image_size, patch_size=14, hidden_size=256,
                                         intermediate_size=1024, num_layers=4, num_heads=4),
            text=llama.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                                   num_layers=a.layers, num_heads=a.hidden // 64, num_kv_heads=a.hidden // 64,
                                   max_position_embeddings=2048),
            projector_type="mlp2x_gelu", image_token_index=a.vocab - 1)
        base = llava.init_params(config, jax.random.PRNGKey(0))
    config = config.with_runtime(dtype=a.dtype, param_dtype=a.dtype)
    base = jax.tree_util.tree_map(lambda x: jnp.asarray(x, a.dtype), base)
    return config, base, hf, torch_device, init_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="both", choices=("both", "full", "lora"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512, help="tokens per item, image placeholders included")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=5, help=f"timed steps, after {WARMUP} warm-up steps")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--skip-hf", action="store_true", help="time ours only (e.g. on a GPU without torch)")
    p.add_argument("--peak", action="store_true", help="also measure a 4096^3 float32 matmul's FLOP/s (jax, torch)")
    p.add_argument("--cpu-shapes", default="auto", choices=CPU_SHAPES_CHOICES,
                   help="model.cpu_shapes (auto: on on a CPU); both: ours with it on and off, taking turns")
    a = p.parse_args()

    from llava_jax.train.metrics import peak_flops

    modes = ["full", "lora"] if a.mode == "both" else [a.mode]
    config, base, hf, torch_device, init_state = build_models(a)
    batch = make_batch(a.batch, a.seq, a.vocab, config.num_image_tokens, config.image_token_index, a.image_size)
    tokens = a.batch * a.seq
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)

    rows, footer = [], []
    for mode in modes:
        flops = step_flops(mode, config, base, a.batch, a.seq)
        variants = cpu_shapes_variants(a.cpu_shapes)
        steps = {f"ours-{mode}{suffix}": ours_step_fn(mode, config.with_runtime(cpu_shapes=on), base, batch,
                                                      a.lora_rank, a.lora_alpha, a.dtype, WARMUP + a.steps)
                 for suffix, on in variants}
        if hf is not None:
            hf, steps[f"HF-{mode}"] = hf_step_fn(mode, hf, init_state, batch, a.lora_rank, a.lora_alpha, torch_device)
        timed = time_steps(steps, a.steps)
        for name, (secs, best, _, _) in timed.items():
            rows.append((name, mode, secs, best, flops))
            print(f"{name}: {secs:.3f} s/step", file=sys.stderr, flush=True)  # progress of a long run
        ours_loss, first = timed[f"ours-{mode}{variants[0][0]}"][2:]
        line = f"step-0 loss {mode}: ours {ours_loss:.6f}"
        if len(variants) > 1:
            line += f" ({variants[0][0].strip()}; {variants[1][0].strip()}: " \
                    f"{timed[f'ours-{mode}{variants[1][0]}'][2]:.6f})"
        if hf is not None:
            hf_loss = timed[f"HF-{mode}"][2]
            line += f", HF {hf_loss:.6f}, |diff| {abs(ours_loss - hf_loss):.2e}"
        footer.append(f"{line} (ours: compile + first step {first:.1f}s)")

    lora_note = f", LoRA r={a.lora_rank} alpha={a.lora_alpha:g}" if "lora" in modes else ""
    print(f"LLaVA {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, batch {a.batch} x seq {a.seq} "
          f"({config.num_image_tokens} image tokens), {a.dtype}{lora_note}, jax on {device.device_kind}"
          + (f", torch on {torch_device}" if torch_device is not None else "")
          + f"; median of {a.steps} steps after {WARMUP} warm-up, ours and HF taking turns")
    print(f"{'run':<28}{'s/step':>9}{'tokens/s':>11}{'GF/s':>8}{'MFU':>8}{'ours/HF':>9}{'best s':>9}{'ours/HF':>9}")
    hf_secs = {mode: (secs, best) for name, mode, secs, best, _ in rows if name.startswith("HF")}
    for name, mode, secs, best, flops in rows:
        mfu = f"{flops / secs / peak:.1%}" if peak else "n/a"
        ours_vs_hf = name.startswith("ours") and mode in hf_secs
        ratio = f"{hf_secs[mode][0] / secs:.2f}x" if ours_vs_hf else ""
        best_ratio = f"{hf_secs[mode][1] / best:.2f}x" if ours_vs_hf else ""
        print(f"{name:<28}{secs:>9.3f}{tokens / secs:>11.0f}{flops / secs / 1e9:>8.0f}{mfu:>8}{ratio:>9}{best:>9.3f}"
              f"{best_ratio:>9}")
    print("GF/s: the step's model FLOPs (the same count for both) per second")
    if hf_secs:
        print("ours/HF = tokens/s of ours over HF's (> 1: ours faster), from the median and from the fastest step")
    if a.peak:
        peaks = matmul_peak(torch_device)
        print("float32 matmul 4096^3, best of 5: " + ", ".join(f"{k} {v / 1e9:.0f} GF/s" for k, v in peaks.items()))
    print("\n".join(footer))


if __name__ == "__main__":
    main()
