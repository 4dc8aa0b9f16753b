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

--vs-hf: our PPO step from the library pieces (scripts/bench_ppo_world.py: rollout.
generate_responses, score_responses, recompute_old, finish_rollout, ppo.ppo_step) against
scripts/torch_ppo_reference.py (HF transformers + peft, one base with four named adapters, as
the original) on one random world exported with convert.export_hf and write_peft_adapter,
so both hold identical weights; synthetic left-padded prompts with images; the reward model
reads query + response + a fixed rating prompt, left padded (one host builder for both
sides); the original's '?' cut at two synthetic ids (--cut-ids). PPO semantics from
configs/common.py `ppo.*` (the defaults are the original's); lr constant (--lr) so every
update moves the weights. A warm-up round (ours compiles) is reported apart; then ours and
HF alternate for --rounds rounds and the table gives medians. Before HF trains, both sides
score OUR first rollout and take its first minibatch update: log-probs (on valid tokens),
values, RM scores, advantages, returns, both losses and each role's gradient norm must
agree (the printed check; exit status 1 if not). The last line is `ppo step ours/hf: X.XXx`,
HF seconds over ours (> 1: ours faster). On a busy CPU, torch's OpenMP threads wait
passively (see torch_wait_policy).
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
from typing import TYPE_CHECKING, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too

import jax  # noqa: E402
import numpy as np  # noqa: E402

from scripts.bench_ppo_world import (EOS, MODELS, PAD, PHASES, OursPPO, build_config, cut_ids,  # noqa: E402
                                     describe, export_world, make_prompts, make_roles, minibatch_orders,
                                     reward_inputs)

if TYPE_CHECKING:
    from llava_jax.models.llava import LlavaConfig


# --- default mode: the PPO driver ------------------------------------------------------------------------------
def make_world(root: str, config: LlavaConfig, rank: int) -> tuple[str, str]:
    from llava_jax.models import heads, lora as lora_lib
    from llava_jax.models.weights import save_checkpoint, write_adapter_dir
    from llava_jax.models.llava import init_params

    base = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    save_checkpoint(os.path.join(root, "base"), config, jax.tree_util.tree_map(np.asarray, base))
    adapter = lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=rank, alpha=16.0), jax.random.PRNGKey(1))
    head = heads.init_head("reward", config.text.hidden_size, jax.random.PRNGKey(2))
    write_adapter_dir(os.path.join(root, "reward"), adapter, head, "reward")
    return os.path.join(root, "base"), os.path.join(root, "reward")


def run_driver(cfg: Any) -> None:
    """The one call into the PPO driver (its module has moved once: ppo_trainer -> ppo_loop)."""
    try:
        from llava_jax.rl.loop import run_ppo
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
        cfg.ppo.reward_adapter, cfg.model.cpu_shapes = reward, a.cpu_shapes
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


# --- --vs-hf: the check and the timed rounds --------------------------------------------------------------------
CHECKED = ("logprobs", "ref_logprobs", "values", "rm_raw", "advantages", "returns", "policy_loss", "value_loss",
           "policy_grad_norm", "value_grad_norm", "value_head_grad_norm", "grad_norm")


def torch_wait_policy() -> str:
    """torch's OpenMP wait policy, set to PASSIVE before torch loads when the CPU is
    oversubscribed. Measured on a 2-core machine under a load of 6-9: HF steps up to 100x
    slower with the default policy (a parallel region waits on a descheduled partner thread);
    on the same machine idle, PASSIVE made them 3x slower (a wake-up per tiny op). Neither is
    the work being compared, so each is used where it does not distort."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    if policy is None and "torch" not in sys.modules:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            return f"PASSIVE (set: load {load:.1f} on {cores} cores)"
    return policy or ("default" if "torch" not in sys.modules else "as torch was loaded")


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
    a.omp = torch_wait_policy()
    import torch

    from scripts.torch_ppo_reference import TorchPPO, TorchPPOHyper

    torch.set_num_threads(a.torch_threads or os.cpu_count() or 1)
    config = build_config(a.model, a.layers, a.vocab)
    rating_ids = np.random.RandomState(1).randint(3, config.text.vocab_size - 1, size=a.rating_len).astype(np.int32)
    prompts = make_prompts(config, a.rollout_batch, a.text_len)
    base, adapters, head_of = make_roles(config, a.lora_rank)
    cuts = cut_ids(a.cut_ids, config)
    from llava_jax.settings import cpu_shapes_on

    a.cpu_shapes_on = cpu_shapes_on(a.cpu_shapes, jax.default_backend())
    ours = OursPPO(config, base, adapters, head_of, response_len=a.response_len, dtype=a.dtype, lr=a.lr,
                   rating_ids=rating_ids, cut_ids=cuts, cpu_shapes=a.cpu_shapes_on)
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
    fields = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
    mine = {**{k: np.asarray(v) for k, v in fields.items() if v is not None}, **ours.grad_norms(rollout, first_rows)}
    first = ours.update(rollout, orders(0), a.step_batch, times)[0]
    mine.update(policy_loss=first["policy_loss"], value_loss=first["value_loss"], grad_norm=first["grad_norm"])
    shared = {**{k: mine[k] for k, v in fields.items() if v is not None}, **prompts}
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


def print_table(a: argparse.Namespace, config: LlavaConfig, device: str, epochs: int, rounds: dict,
                warm: dict, check: list[str]) -> None:
    import torch

    med = {side: {k: statistics.median(t[k] for t in rows) for k in PHASES} for side, rows in rounds.items()}
    for side, rows in rounds.items():
        med[side]["total"] = statistics.median(sum(t.values()) for t in rows)
    updates = epochs * (a.rollout_batch // a.step_batch)
    names = {"sampling": f"sampling ({a.response_len} new tokens)",
             "scoring": "scoring (old, ref log-probs; values; RM; advantages)",
             "update": f"update ({epochs} epochs x {a.rollout_batch // a.step_batch} minibatches = {updates} steps)",
             "total": "PPO step"}
    print(f"\nours: jax on {jax.devices()[0].device_kind}; hf: torch {device} (transformers + peft, the original's "
          f"way; {torch.get_num_threads()} threads, OMP_WAIT_POLICY {a.omp}); {describe(config)}; "
          f"rollout_batch={a.rollout_batch} step_batch={a.step_batch} "
          f"response_len={a.response_len} query={a.text_len + 1 + config.num_image_tokens} tokens lora_rank="
          f"{a.lora_rank} dtype={a.dtype} cpu_shapes={'on' if a.cpu_shapes_on else 'off'}; "
          f"median of {a.rounds} alternating rounds after a warm-up round")
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
    p.add_argument("--cpu-shapes", default="auto", choices=("auto", "on", "off"),
                   help="model.cpu_shapes (auto: on on a CPU)")
    p.add_argument("--vs-hf", action="store_true", help="time ours against the torch reference (see above)")
    p.add_argument("--rounds", type=int, default=3, help="--vs-hf: timed rounds of each side after the warm-up")
    p.add_argument("--vocab", type=int, default=512, help="--vs-hf: vocabulary size (placeholder = vocab - 1)")
    p.add_argument("--text-len", type=int, default=16, help="--vs-hf: text tokens per query (+ BOS and image)")
    p.add_argument("--rating-len", type=int, default=48, help="--vs-hf: tokens of the RM's rating prompt")
    p.add_argument("--lr", type=float, default=3e-5, help="--vs-hf: constant learning rate")
    p.add_argument("--torch-threads", type=int, default=0, help="--vs-hf: torch's intra-op threads (0: all cores)")
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
