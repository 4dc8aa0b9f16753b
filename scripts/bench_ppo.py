#!/usr/bin/env python
"""Seconds per PPO step, split into sampling, scoring and update; with --vs-hf, against a
PyTorch PPO step done the original LLaVA-RLHF way on the same weights and prompts.

  python scripts/bench_ppo.py --model tiny
  python scripts/bench_ppo.py --model small --rollout-batch 16 --response-len 64
  python scripts/bench_ppo.py --model 7b --rollout-batch 64 --response-len 512 --dtype bfloat16   # a GPU
  python scripts/bench_ppo.py --vs-hf [--model tiny --rollout-batch 16 --step-batch 8 --response-len 32 --rounds 3]

Default mode: our PPO driver on random weights (a random policy rarely stops, so every
response runs to --response-len: the worst case), the toy prompts, tokenizer and captions,
one shared base for the four roles; the first step includes compilation and is reported
apart, the table shows the median of the later steps.

--vs-hf: our PPO step from the library pieces (rollout.generate_responses, score_responses,
recompute_old, finish_rollout, ppo.ppo_step) and tests/torch_ppo_reference.py (HF
transformers + peft, one base with four named adapters, as the original) on one random
world exported with convert.export_hf and write_peft_adapter, so both hold identical
weights; synthetic left-padded prompts with images; the reward model reads query +
response + a fixed rating prompt, left padded (one host builder for both sides). PPO
semantics from configs/common.py `ppo.*` (the defaults are the original's); lr constant
(--lr) so every update moves the weights. A warm-up round (ours compiles) is reported
apart; then ours and HF alternate for --rounds rounds and the table gives medians. Before
HF trains, both sides score OUR first rollout and take its first minibatch update: the
log-probs, values, RM scores, advantages, policy and value losses and grad norm must agree
(the printed check). The last line is `ppo step ours/hf: X.XXx`, HF seconds over ours
(> 1: ours faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too
# torch's OpenMP threads spin while they wait: on a shared (oversubscribed) CPU that made its
# steps up to 100x slower in our runs (the spinning thread holds the core its partner needs).
# Passive waiting (set before torch loads) keeps the comparison about the work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {  # name: (layers, hidden, intermediate, heads, image size)
    "tiny": None,  # tiny_config()
    "small": (8, 512, 1408, 8, 112),
    "7b": (32, 4096, 11008, 32, 224),
}
PAD, BOS, EOS = 0, 1, 2
PHASES = ("sampling", "scoring", "update")


def build_config(name: str, layers: int | None, vocab: int = 512):
    """Vocab 512 with <image> = 511 fits the bundled toy tokenizer (the driver mode)."""
    from llava_jax.models import clip, llama, llava

    if MODELS[name] is None:
        config = llava.tiny_config()
        return config if layers is None else dataclasses.replace(
            config, text=dataclasses.replace(config.text, num_layers=layers))
    n, hidden, inter, heads, image = MODELS[name]
    vision = (clip.ClipVisionConfig(image_size=image, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                    num_layers=24, num_heads=16) if name == "7b" else
              clip.ClipVisionConfig(image_size=image, patch_size=14, hidden_size=256, intermediate_size=1024,
                                    num_layers=4, num_heads=4))
    text = llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers or n,
                             num_heads=heads, num_kv_heads=heads, max_position_embeddings=4096)
    return llava.LlavaConfig(vision=vision, text=text, projector_type="linear", image_token_index=vocab - 1)


# --- default mode: the PPO driver ------------------------------------------------------------------------------
def make_world(root: str, config, rank: int) -> tuple[str, str]:
    from llava_jax import heads, lora as lora_lib
    from llava_jax.model_ckpt import save_checkpoint, write_adapter_dir
    from llava_jax.models.llava import init_params

    base = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    save_checkpoint(os.path.join(root, "base"), config, jax.tree_util.tree_map(np.asarray, base))
    adapter = lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=rank, alpha=16.0), jax.random.PRNGKey(1))
    head = heads.init_head("reward", config.text.hidden_size, jax.random.PRNGKey(2))
    write_adapter_dir(os.path.join(root, "reward"), adapter, head, "reward")
    return os.path.join(root, "base"), os.path.join(root, "reward")


def run_driver(cfg) -> None:
    """The one call into the PPO driver (its module has moved once: ppo_trainer -> ppo_loop)."""
    try:
        from llava_jax.ppo_loop import run_ppo
        from llava_jax.settings import RunSettings
    except ImportError:
        from llava_jax.ppo_trainer import run_ppo  # the driver before the settings refactor

        run_ppo(cfg)
        return
    run_ppo(RunSettings.from_config(cfg))


def driver_main(a: argparse.Namespace) -> None:
    from configs.tiny_ppo import get_config

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
        run_driver(cfg)
        with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    first, later = rows[0], rows[1:] or rows
    med = {k: statistics.median(r[k] for r in later) for k in ("rollout_seconds", "score_seconds", "update_seconds",
                                                                "step_seconds", "response_length")}
    print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}  {describe(config)}  "
          f"rollout_batch={a.rollout_batch} step_batch={a.step_batch} response_len={a.response_len} dtype={a.dtype}")
    print("| phase | seconds / PPO step | share |")
    print("|---|---|---|")
    for key, name in (("rollout_seconds", "rollout (sampling)"), ("score_seconds", "scoring (ref, value, RM)"),
                      ("update_seconds", "update (PPO epochs)")):
        print(f"| {name} | {med[key]:.3f} | {med[key] / med['step_seconds']:.0%} |")
    print(f"| total | {med['step_seconds']:.3f} | mean response {med['response_length']:.1f} tokens |")
    print(f"first step (with compilation): {first['step_seconds']:.1f} s; median over {len(later)} later steps")


def describe(config) -> str:
    t = config.text
    llm = t.num_layers * (4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size)
    return (f"{t.num_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, ~{llm / 1e6:.0f}M LLM params, "
            f"{config.num_image_tokens} image tokens")


# --- the random PPO world of --vs-hf (and bench_gpu) ---------------------------------------------------------
def random_adapter(base: dict, lora, rng, scale: float = 0.05):
    """A LoRA adapter with random `b` too (a trained adapter: it moves the model off the base)."""
    from llava_jax import lora as lora_lib

    adapter = lora_lib.init_adapter(base, lora, rng)
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapter.params)
    keys = jax.random.split(jax.random.fold_in(rng, 7), len(leaves))
    params = [scale * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "b" else x
              for (path, x), k in zip(leaves, keys)]
    return lora_lib.Adapter(jax.tree_util.tree_unflatten(tree, params), lora)


def make_roles(config, rank: int, alpha: float = 16.0, seed: int = 0, base: dict | None = None
               ) -> tuple[dict, dict, dict]:
    """(base, adapters by role, heads by kind), host arrays (`base` when given is kept as is).
    The policy has moved off its reference (two random adapters); the value adapter starts
    as the reward adapter (the original's init); the value head is random rather than the
    original's zeros, so the first update already sends gradients through the value adapter."""
    from llava_jax import heads, lora as lora_lib
    from llava_jax.models.llava import init_params

    key = jax.random.PRNGKey(seed)
    to_host = functools.partial(jax.tree_util.tree_map, np.asarray)
    base = to_host(jax.device_get(init_params(config, key))) if base is None else base
    lora = lora_lib.LoraConfig(rank=rank, alpha=alpha)
    adapters = {name: random_adapter(base, lora, jax.random.fold_in(key, i + 1))
                for i, name in enumerate(("policy", "ref_policy", "reward"))}
    adapters["value"] = adapters["reward"]
    head_of = {kind: heads.init_head("reward", config.text.hidden_size, jax.random.fold_in(key, 10 + i))
               for i, kind in enumerate(("reward", "value"))}
    return base, {k: lora_lib.Adapter(to_host(v.params), v.config) for k, v in adapters.items()}, to_host(head_of)


def export_world(root: str, config, base: dict, adapters: dict, head_of: dict) -> tuple[str, dict]:
    """The world as HF files: a llava-hf directory and one PEFT directory per role (heads beside)."""
    from llava_jax.convert import export_hf
    from llava_jax.convert.peft import write_peft_adapter

    hf_dir = os.path.join(root, "hf")
    export_hf(config, base, hf_dir)
    dirs = {}
    for name, adapter in adapters.items():
        dirs[name] = os.path.join(root, name)
        kind = name if name in head_of else None
        write_peft_adapter(dirs[name], adapter, head_of.get(kind), kind)
    return hf_dir, dirs


def make_prompts(config, batch: int, text_len: int, seed: int = 0) -> dict:
    """Left-padded queries (BOS, the image placeholders, text; row b has b % 4 pads) and images."""
    rng = np.random.RandomState(seed)
    n_img, size, vocab = config.num_image_tokens, config.vision.image_size, config.text.vocab_size
    width = 1 + n_img + text_len
    ids = np.full((batch, width), PAD, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for b in range(batch):
        pad = b % 4
        text = rng.randint(3, vocab - 1, size=text_len - pad)  # never the placeholder (vocab - 1)
        ids[b, pad:] = np.concatenate([[BOS], np.full(n_img, config.image_token_index), text])
        mask[b, pad:] = 1
    return {"query_ids": ids, "query_mask": mask,
            "pixel_values": rng.randn(batch, size, size, config.vision.num_channels).astype(np.float32),
            "length_bonus": np.ones(batch, np.float32), "valid": np.ones(batch, np.int32)}


def reward_inputs(rollout: dict, rating_ids: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """The RM's input per row: query + response (valid tokens) + the rating prompt, left
    padded to a multiple of `multiple` (the original reads the score at the last position)."""
    rows = [np.concatenate([q[qm.astype(bool)], r[rm.astype(bool)], rating_ids])
            for q, qm, r, rm in zip(rollout["query_ids"], rollout["query_mask"], rollout["response"],
                                    rollout["response_mask"])]
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
    return ids, mask


def cut_ids(text: str, config) -> tuple[int, ...]:
    """The ids standing for LLaMA's two '?' tokens (1577, 29973) the original cuts responses at:
    `text` (comma-separated) or, when empty, the two ids below the placeholder."""
    vocab = config.text.vocab_size
    return tuple(int(t) for t in text.split(",") if t.strip()) if text else (vocab - 3, vocab - 2)


def minibatch_orders(seed: int, round_: int, epochs: int, rows: int) -> list[np.ndarray]:
    return [np.random.default_rng((seed, round_, e)).permutation(rows) for e in range(epochs)]


def ppo_settings(lr: float):
    """(PPOHyper, RewardWeights, kl_coef, OptimConfig) from configs/common.py; lr constant."""
    from configs.common import base_config
    from llava_jax import fact_reward, ppo
    from llava_jax.optim import OptimConfig

    c = base_config()
    p = c.ppo
    hyper = ppo.PPOHyper(clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef, gamma=p.gamma, lam=p.lam,
                         kl_estimator=p.kl_estimator, reward_scale=p.reward_scale, whiten_rewards=p.whiten_rewards,
                         whiten_over_pads=p.whiten_over_pads, loss_over_pads=p.loss_over_pads,
                         exact_ratio=p.old_logprobs == "recompute")
    weights = fact_reward.RewardWeights(p.rm_weight, p.correct_bonus, p.length_bonus, p.no_stop_penalty)
    optim = OptimConfig(learning_rate=lr, schedule="constant", warmup_steps=0, warmup_ratio=0.0,
                        weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                        max_grad_norm=c.optim.max_grad_norm)
    return hyper, weights, float(p.kl_coef), optim, c


class OursPPO:
    """Our PPO step from the library pieces, one jitted pass per piece as the driver runs them."""

    def __init__(self, config, base: dict, adapters: dict, head_of: dict, *, response_len: int, dtype: str,
                 lr: float = 3e-5, rating_ids: np.ndarray, cut_ids: tuple[int, ...] = (), seed: int = 0):
        from llava_jax import ppo, roles, rollout, trainable
        from llava_jax.sampling import SamplingConfig
        from llava_jax.optim import make_optimizer
        from llava_jax.train_state import create_state

        self.hyper, weights, self.kl_coef, optim, self.cfg = ppo_settings(lr)
        config = config.with_runtime(dtype=dtype, param_dtype=dtype)
        lora = adapters["policy"].config
        self.spec = spec = roles.PPOSpec(config, lora, config, lora, lora, shared_base=True,
                                         temperature=self.cfg.ppo.temperature)
        sampling = SamplingConfig(max_new_tokens=response_len, temperature=self.cfg.ppo.temperature,
                                  top_p=self.cfg.ppo.top_p, top_k=self.cfg.ppo.top_k, eos_id=EOS, pad_id=PAD,
                                  cache_dtype=dtype)
        optimizer, schedule = make_optimizer(optim, 1)
        f32 = functools.partial(trainable.cast_tree, dtype=jnp.float32)
        self.frozen = {"policy_base": jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), base),
                       "ref": f32(adapters["ref_policy"].params), "reward": f32(adapters["reward"].params),
                       "reward_head": f32(head_of["reward"])}
        params = {"policy": f32(adapters["policy"].params), "value": f32(adapters["value"].params),
                  "value_head": f32(head_of["value"])}
        self.state = create_state(params, optimizer, jax.random.PRNGKey(seed))
        self.rating_ids, self.multiple = rating_ids, self.cfg.ppo.reward_pad_multiple
        cut_ids = cut_ids if self.cfg.ppo.cut_at_question_mark else ()
        self._generate = jax.jit(functools.partial(rollout.generate_responses, spec, sampling, cut_ids))
        self._score = jax.jit(functools.partial(rollout.score_responses, spec, False))  # values: recompute_old
        self._recompute = jax.jit(functools.partial(rollout.recompute_old, spec))
        self._finish = jax.jit(functools.partial(rollout.finish_rollout, self.hyper, weights, response_len, EOS))
        self._step = jax.jit(functools.partial(ppo.ppo_step, spec, self.hyper, optimizer, schedule),
                             donate_argnums=(0,))
        self._take = jax.jit(lambda tree, idx: jax.tree_util.tree_map(lambda x: x[idx], tree))
        self.update_keys = rollout.UPDATE_KEYS

    def rollout(self, prompts: dict, seed: int, times: dict) -> dict:
        """Sampled, scored rollout with advantages (device arrays)."""
        begin = time.perf_counter()
        batch = {k: jnp.asarray(v) for k, v in prompts.items()}
        params = self.state.params
        generated = jax.block_until_ready(self._generate(self.frozen, params, batch, jax.random.PRNGKey(seed)))
        times["sampling"] = time.perf_counter() - begin
        begin = time.perf_counter()
        self.last_length = float(np.asarray(generated["response_mask"]).sum(1).mean())
        host = {**prompts, "response": np.asarray(generated["response"]),
                "response_mask": np.asarray(generated["response_mask"])}
        ids, mask = reward_inputs(host, self.rating_ids, self.multiple)
        out = {**batch, **generated, "reward_ids": jnp.asarray(ids), "reward_mask": jnp.asarray(mask)}
        out.update(self._score(self.frozen, params, out))
        out.update(self._recompute(self.frozen, params, out))
        out["correct"] = jnp.zeros(len(ids), jnp.float32)  # synthetic prompts: no multiple-choice answers
        out = {k: v for k, v in out.items() if k not in ("pixel_values", "reward_ids", "reward_mask")}
        out, _ = jax.block_until_ready(self._finish(out, jnp.float32(self.kl_coef)))
        times["scoring"] = time.perf_counter() - begin
        return out

    def update(self, rollout: dict, orders: list[np.ndarray], step_batch: int, times: dict) -> list[dict]:
        begin = time.perf_counter()
        data = {k: v for k, v in rollout.items() if k in self.update_keys}
        metrics = []
        for order in orders:
            for start in range(0, len(order), step_batch):
                minibatch = self._take(data, jnp.asarray(order[start:start + step_batch]))
                self.state, m = self._step(self.state, self.frozen, minibatch)
                metrics.append(m)
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - begin
        return metrics

    def grad_norms(self, rollout: dict, rows: np.ndarray) -> dict[str, float]:
        """Each trained tree's gradient norm of the mean loss on rows `rows` (for the check)."""
        import optax

        from llava_jax import ppo

        def loss(params, minibatch):
            total, aux = ppo.ppo_loss_sums(self.spec, self.hyper, params, self.frozen, minibatch)
            return total / jnp.maximum(aux["tokens"], 1.0)

        minibatch = self._take({k: v for k, v in rollout.items() if k in self.update_keys}, jnp.asarray(rows))
        grads = jax.jit(jax.grad(loss))(self.state.params, minibatch)
        return {f"{k}_grad_norm": float(optax.tree.norm(g)) for k, g in grads.items()}

    def step(self, prompts: dict, seed: int, orders: list[np.ndarray], step_batch: int) -> tuple[dict, dict, list]:
        times: dict = {}
        rollout = self.rollout(prompts, seed, times)
        return times, rollout, self.update(rollout, orders, step_batch, times)


# --- --vs-hf: the check and the timed rounds --------------------------------------------------------------------
CHECKED = ("logprobs", "ref_logprobs", "values", "rm_raw", "advantages", "returns", "policy_loss", "value_loss",
           "policy_grad_norm", "value_grad_norm", "value_head_grad_norm", "grad_norm")


def check_vs_torch(ours: dict, theirs: dict, tight: bool) -> tuple[bool, list[str]]:
    """Our rollout's quantities and first update against the reference's on the same rollout
    at the same initial weights. Tolerances: float32 on CPU, else bf16 / TF32 sized."""
    rtol, atol = (1e-4, 1e-4) if tight else (3e-2, 3e-2)
    ok, parts = True, []
    for key in CHECKED:
        mine, other = np.asarray(ours[key], np.float64), np.asarray(theirs[key], np.float64)
        if key in ("logprobs", "ref_logprobs"):  # a pad's log-prob is a convention (0 there, any value here)
            valid = np.asarray(ours["response_mask"], bool)
            mine, other = mine[valid], other[valid]
        good = bool(np.all(np.abs(mine - other) <= atol + rtol * np.abs(other)))
        ok &= good
        scalar = f" {float(mine):.7g} vs {float(other):.7g}" if mine.ndim == 0 else ""
        parts.append(f"{key}{scalar} max|diff| {float(np.max(np.abs(mine - other))):.1e}{'' if good else ' FAIL'}")
    return ok, ["check (ours vs hf on our first rollout at the initial weights: its scores, advantages and first "
                "minibatch update):", "  " + "; ".join(parts[:6]), "  " + "; ".join(parts[6:]),
                f"check (rtol {rtol:g}, atol {atol:g}): {'PASS' if ok else 'FAIL'}"]


def vs_hf_main(a: argparse.Namespace) -> bool:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_ppo_reference import TorchPPO, TorchPPOHyper

    torch.set_num_threads(os.cpu_count() or 1)
    config = build_config(a.model, a.layers, a.vocab)
    rating_ids = np.random.RandomState(1).randint(3, config.text.vocab_size - 1, size=a.rating_len).astype(np.int32)
    prompts = make_prompts(config, a.rollout_batch, a.text_len)
    base, adapters, head_of = make_roles(config, a.lora_rank)
    cuts = cut_ids(a.cut_ids, config)
    ours = OursPPO(config, base, adapters, head_of, response_len=a.response_len, dtype=a.dtype, lr=a.lr,
                   rating_ids=rating_ids, cut_ids=cuts)
    hyper = TorchPPOHyper.from_config(ours.cfg, a.response_len, a.lr, eos_id=EOS, pad_id=PAD,
                                      suppress_ids=(config.image_token_index,), cut_ids=cuts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as root:
        hf_dir, dirs = export_world(root, config, base, adapters, head_of)
        reference = TorchPPO(hf_dir, dirs, hyper, dtype=a.dtype, device=device)
    reward_fn = functools.partial(reward_inputs, rating_ids=rating_ids, multiple=ours.multiple)
    epochs = ours.cfg.ppo.ppo_epochs
    orders = lambda r: minibatch_orders(0, r, epochs, a.rollout_batch)  # noqa: E731

    # Warm-up round (ours compiles): the rollout, the check on it before either side trains, the update.
    times: dict = {}
    rollout = ours.rollout(prompts, 0, times)
    first_length = ours.last_length
    first_rows = orders(0)[0][:a.step_batch]
    mine = {**{k: np.asarray(v) for k, v in rollout.items()}, **ours.grad_norms(rollout, first_rows)}
    first = ours.update(rollout, orders(0), a.step_batch, times)[0]
    mine.update(policy_loss=first["policy_loss"], value_loss=first["value_loss"], grad_norm=first["grad_norm"])
    shared = {**{k: mine[k] for k in rollout}, **prompts}
    theirs = reference.scores_of(shared, reward_fn)
    theirs.update(reference.loss_and_grads({k: v[first_rows] for k, v in shared.items()}))
    reference.optimizer.zero_grad(set_to_none=True)
    ok, check = check_vs_torch(mine, theirs, tight=a.dtype == "float32" and jax.devices()[0].platform == "cpu")
    warm = {"ours": times, "hf": reference.step(prompts, 0, reward_fn, orders(0), a.step_batch)}
    rounds: dict[str, list[dict]] = {"ours": [], "hf": []}
    lengths: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(1, a.rounds + 1):  # alternating: a shared machine's load hits both alike
        rounds["ours"].append(ours.step(prompts, r, orders(r), a.step_batch)[0])
        rounds["hf"].append(reference.step(prompts, r, reward_fn, orders(r), a.step_batch))
        lengths["ours"].append(ours.last_length)
        lengths["hf"].append(reference.last_length)
    check.insert(0, "rounds, s (mean response tokens): " + "; ".join(
        f"{side} " + ", ".join(f"{sum(t.values()):.3f} ({n:.1f})" for t, n in zip(rounds[side], lengths[side]))
        for side in rounds) + f"; the first rollout: {first_length:.1f} tokens")
    print_table(a, config, device, epochs, rounds, warm, check)
    return ok


def print_table(a: argparse.Namespace, config, device: str, epochs: int, rounds: dict, warm: dict,
                check: list[str]) -> None:
    med = {side: {k: statistics.median(t[k] for t in rows) for k in PHASES} for side, rows in rounds.items()}
    for side, rows in rounds.items():
        med[side]["total"] = statistics.median(sum(t.values()) for t in rows)
    updates = epochs * (a.rollout_batch // a.step_batch)
    names = {"sampling": f"sampling ({a.response_len} new tokens)",
             "scoring": "scoring (old, ref log-probs; values; RM; advantages)",
             "update": f"update ({epochs} epochs x {a.rollout_batch // a.step_batch} minibatches = {updates} steps)",
             "total": "PPO step"}
    print(f"\nours: jax on {jax.devices()[0].device_kind}; hf: torch {device} (transformers + peft, the original's "
          f"way; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); {describe(config)}; "
          f"rollout_batch={a.rollout_batch} step_batch={a.step_batch} "
          f"response_len={a.response_len} query={a.text_len + 1 + config.num_image_tokens} tokens lora_rank="
          f"{a.lora_rank} dtype={a.dtype}; median of {a.rounds} alternating rounds after a warm-up round")
    print("| phase | ours s | hf s | hf/ours (> 1: ours faster) |")
    print("|---|---|---|---|")
    for key in (*PHASES, "total"):
        print(f"| {names[key]} | {med['ours'][key]:.3f} | {med['hf'][key]:.3f} | "
              f"{med['hf'][key] / med['ours'][key]:.2f}x |")
    print("warm-up round (ours compiles): " + "; ".join(
        f"{side} {sum(t.values()):.1f} s (" + ", ".join(f"{k} {t[k]:.1f}" for k in PHASES) + ")"
        for side, t in warm.items()))
    print("\n".join(check))
    print(f"ppo step ours/hf: {med['hf']['total'] / med['ours']['total']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="override the LLM layer count")
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--step-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="driver mode only")
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="driver mode: PPO steps (the first compiles)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="none", help="driver mode only")
    p.add_argument("--vs-hf", action="store_true", help="time ours against the torch reference (see above)")
    p.add_argument("--rounds", type=int, default=3, help="--vs-hf: timed rounds of each side after the warm-up")
    p.add_argument("--vocab", type=int, default=512, help="--vs-hf: vocabulary size (placeholder = vocab - 1)")
    p.add_argument("--text-len", type=int, default=16, help="--vs-hf: text tokens per query (+ BOS and image)")
    p.add_argument("--rating-len", type=int, default=48, help="--vs-hf: tokens of the RM's rating prompt")
    p.add_argument("--lr", type=float, default=3e-5, help="--vs-hf: constant learning rate")
    p.add_argument("--cut-ids", default="", help="--vs-hf: comma-separated ids standing for the original's '?' "
                   "cut (default: vocab - 3, vocab - 2)")
    a = p.parse_args(argv)
    if a.rollout_batch % a.step_batch:
        raise SystemExit(f"--rollout-batch {a.rollout_batch} must be a multiple of --step-batch {a.step_batch}")
    if not a.vs_hf:
        driver_main(a)
    elif not vs_hf_main(a):
        sys.exit(1)


if __name__ == "__main__":
    main()
