#!/usr/bin/env python
"""Seconds per PPO step, split into rollout (sampling), scoring (host reward inputs + ref
log-probs, values and RM score + advantages) and update (ppo_epochs x minibatch steps).

  python scripts/bench_ppo.py --model tiny
  python scripts/bench_ppo.py --model small --rollout-batch 16 --response-len 64
  python scripts/bench_ppo.py --model 7b --rollout-batch 64 --response-len 512 --dtype bfloat16   # a GPU

Random weights (a random policy rarely stops, so every response runs to --response-len:
the worst case), the toy prompts, tokenizer and captions, one shared base for the four
roles. The first step includes compilation and is reported apart; the table shows the
median of the later steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {  # name: (layers, hidden, intermediate, heads, image size)
    "tiny": None,  # tiny_config()
    "small": (8, 512, 1408, 8, 112),
    "7b": (32, 4096, 11008, 32, 224),
}


def build_config(name: str, layers: int | None):
    from llava_jax.models import clip, llama, llava

    if MODELS[name] is None:
        return llava.tiny_config()
    n, hidden, inter, heads, image = MODELS[name]
    vision = (clip.ClipVisionConfig(image_size=image, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                    num_layers=24, num_heads=16) if name == "7b" else
              clip.ClipVisionConfig(image_size=image, patch_size=14, hidden_size=256, intermediate_size=1024,
                                    num_layers=4, num_heads=4))
    # vocab 512 with <image> = 511: the bundled toy tokenizer drives the rollouts
    text = llama.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_layers=layers or n,
                             num_heads=heads, num_kv_heads=heads, max_position_embeddings=4096)
    return llava.LlavaConfig(vision=vision, text=text, projector_type="linear", image_token_index=511)


def make_world(root: str, config, rank: int) -> tuple[str, str]:
    import jax
    import numpy as np

    from llava_jax import heads, lora as lora_lib
    from llava_jax.model_ckpt import save_checkpoint, write_adapter_dir
    from llava_jax.models.llava import init_params

    base = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    save_checkpoint(os.path.join(root, "base"), config, jax.tree_util.tree_map(np.asarray, base))
    adapter = lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=rank, alpha=16.0), jax.random.PRNGKey(1))
    head = heads.init_head("reward", config.text.hidden_size, jax.random.PRNGKey(2))
    write_adapter_dir(os.path.join(root, "reward"), adapter, head, "reward")
    return os.path.join(root, "base"), os.path.join(root, "reward")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="override the layer count (small / 7b)")
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="PPO steps (the first compiles)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="none")
    a = p.parse_args(argv)

    import jax

    from configs.tiny_ppo import get_config
    from llava_jax.ppo_trainer import run_ppo

    config = build_config(a.model, a.layers)
    with tempfile.TemporaryDirectory() as root:
        base, reward = make_world(root, config, a.lora_rank)
        cfg = get_config()
        cfg.requires, cfg.workdir, cfg.resume = "", os.path.join(root, "run"), False
        cfg.model.init, cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = base, a.dtype, a.dtype, a.remat
        cfg.ppo.reward_adapter = reward
        cfg.train.max_steps, cfg.train.lora_rank = a.steps, a.lora_rank
        cfg.ppo.rollout_batch, cfg.ppo.step_batch, cfg.ppo.grad_accum = a.rollout_batch, a.step_batch, a.grad_accum
        cfg.ppo.response_len, cfg.ppo.cache_dtype = a.response_len, a.dtype
        cfg.log.tensorboard, cfg.checkpoint.every = False, 10**6
        run_ppo(cfg)
        with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    first, later = rows[0], rows[1:] or rows
    med = {k: statistics.median(r[k] for r in later) for k in ("rollout_seconds", "score_seconds", "update_seconds",
                                                                "step_seconds", "response_length")}
    llm_params = config.text.num_layers * (4 * config.text.hidden_size ** 2 + 3 * config.text.hidden_size
                                           * config.text.intermediate_size)
    print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}  model={a.model} ({config.text.num_layers} layers, "
          f"hidden {config.text.hidden_size}, ~{llm_params / 1e6:.0f}M LLM params, {config.num_image_tokens} image "
          f"tokens)  rollout_batch={a.rollout_batch} step_batch={a.step_batch} response_len={a.response_len} "
          f"dtype={a.dtype}")
    print("| phase | seconds / PPO step | share |")
    print("|---|---|---|")
    for key, name in (("rollout_seconds", "rollout (sampling)"), ("score_seconds", "scoring (ref, value, RM)"),
                      ("update_seconds", "update (PPO epochs)")):
        print(f"| {name} | {med[key]:.3f} | {med[key] / med['step_seconds']:.0%} |")
    print(f"| total | {med['step_seconds']:.3f} | mean response {med['response_length']:.1f} tokens |")
    print(f"first step (with compilation): {first['step_seconds']:.1f} s; median over {len(later)} later steps")


if __name__ == "__main__":
    main()
