"""Memory per device and compile time of every step of a stage, before any hardware.

Everything is abstract: parameters are `jax.eval_shape` trees (no weights), every argument
is a `ShapeDtypeStruct` carrying its `NamedSharding`, and each step is
`jax.jit(...).lower(...).compile()`-d for the requested mesh (`compile_report.py` reads
the result). The mesh is either a TPU slice's compile-only devices (`targets.py`: the real
TPU compiler, whose figures and out-of-memory refusals are what the chips will do), or
forced host CPU devices (`--xla_force_host_platform_device_count`): XLA:CPU's buffer
assignment for the real shardings, an estimate only (other fusions and layouts, bf16 dots
in f32, no flash attention).

Steps per stage (`STAGE_STEPS`) are built by `STEP_BUILDERS[name](ctx) -> Step`, each
jitted exactly as the trainers jit it.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llava_jax import heads, lora as lora_lib, sharding, trainable
from llava_jax.compile_report import Step, StepReport, compile_step, device_bytes
from llava_jax.targets import GiB
from llava_jax.models.clip import ClipVisionConfig
from llava_jax.models.llama import LlamaConfig
from llava_jax.models.llava import LlavaConfig, init_params, logical_axes, tiny_config

# Per-device memory of named accelerators (HBM per chip; H100 SXM).
DEVICE_MEMORY = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB, "h100": 80 * GiB}
MODEL_PRESETS = ("7b", "13b", "tiny")
STAGE_STEPS = {"sft": ("sft_step",), "rm": ("rm_step",), "ppo": ("rollout_generate", "rollout_score", "ppo_step")}


# ----------------------------------------------------------------------------- parsing

def parse_bytes(text: str) -> int:
    """'16GiB', '16G' (binary), '80GB' (decimal), '512MiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad memory size {text!r}: expected e.g. 16GiB, 80GB or a byte count")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024  # "GB" is decimal; "G" and "GiB" binary
    return int(number * base**power)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'data=1,fsdp=8,tensor=1' or '1,8,1' -> (data, fsdp, tensor); omitted axes are 1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("=" in p for p in parts):
        sizes = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
        unknown = sorted(set(sizes) - set(sharding.MESH_AXES))
        if unknown:
            raise ValueError(f"--mesh: unknown axes {unknown}; expected {sharding.MESH_AXES}")
        return tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
    if len(parts) != 3:
        raise ValueError(f"--mesh {text!r}: expected data=D,fsdp=F,tensor=T or D,F,T")
    return tuple(int(p) for p in parts)


def apply_overrides(cfg: Any, items: list[str]) -> None:
    """`--config.a.b=value` items, as scripts/train.py accepts them (values parsed as Python
    literals, true/false too; ConfigDict's type checks reject a wrong type)."""
    for item in items:
        m = re.fullmatch(r"--config\.([\w.]+)=(.*)", item)
        if not m:
            raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
        from llava_jax.trainer import unknown_field

        problem = unknown_field(cfg, m.group(1))
        if problem:
            raise ValueError(problem)
        *parents, leaf = m.group(1).split(".")
        parent = cfg
        for key in parents:
            parent = parent[key]
        raw = m.group(2)
        try:
            value = ast.literal_eval({"true": "True", "false": "False"}.get(raw.lower(), raw))
        except (ValueError, SyntaxError):
            value = raw
        parent[leaf] = value


# ------------------------------------------------------------------------------ models

def model_preset(name: str) -> LlavaConfig:
    """Full-size LLaVA-RLHF shapes: Vicuna-7B + CLIP ViT-L/14 (224 px, 256 patches) or
    Vicuna-13B + ViT-L/14-336 (576 patches), penultimate-layer features, linear projector,
    placeholder id = vocab size (as the converter assigns it); 'tiny' is the test model."""
    if name == "tiny":
        return tiny_config()
    text = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32),
            "13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)}
    if name not in text:
        raise ValueError(f"unknown model preset {name!r}; expected one of {MODEL_PRESETS}")
    vision = ClipVisionConfig(image_size=224 if name == "7b" else 336, patch_size=14, hidden_size=1024,
                              intermediate_size=4096, num_layers=24, num_heads=16)
    return LlavaConfig(vision=vision, text=LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **text[name]),
                       projector_type="linear", image_token_index=32000, vision_feature_layer=-2)


def resolve_model(init: str, preset: str | None) -> tuple[LlavaConfig, str]:
    """(architecture, where it came from): the preset when named, the tiny model for
    'tiny', `init/config.json` when that checkpoint exists, else a preset guessed from the
    path (`runs/sft_13b/model` -> 13b, `runs/tiny_sft/model` -> tiny); the source is printed so a wrong guess is visible."""
    if preset:
        return model_preset(preset), f"preset {preset}"
    if init == "tiny":
        return tiny_config(), "tiny"
    if os.path.isfile(os.path.join(init, "config.json")):
        from llava_jax.model_ckpt import load_config

        return load_config(init), f"{init}/config.json"
    guess = re.search(r"(?<![0-9])(7|13)b|tiny", init.lower())  # runs/tiny_sft/model: the tiny model
    if guess:
        return model_preset(guess.group(0)), f"preset {guess.group(0)} (no {init}/config.json; guessed from its path)"
    raise ValueError(f"no {init}/config.json and no size in its name: pass --model {'|'.join(MODEL_PRESETS)}")


def with_runtime(cfg: Any, config: LlavaConfig, layers: int | None = None) -> LlavaConfig:
    """The config's dtype / param_dtype / remat knobs, and optionally another LLM depth."""
    from llava_jax.trainer import runtime_knobs

    config = config.with_runtime(**runtime_knobs(cfg))
    if layers:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=layers))
    return config


def abstract_base(config: LlavaConfig) -> dict:
    """ShapeDtypeStructs of the base params in the config's param_dtype (as the trainer loads it)."""
    dtype = jnp.dtype(config.text.param_dtype)
    return jax.eval_shape(lambda: trainable.cast_tree(init_params(config, jax.random.PRNGKey(0)), dtype))


def llm_params(config: LlavaConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_base(config)["llm"]))


def step_flops(config: LlavaConfig, seqs: int, length: int, passes: int = 3) -> float:
    """Model FLOPs of `seqs` sequences of `length` tokens through the LLM: 2 x params x tokens
    per pass (3 passes: forward + backward) plus attention's 4 x layers x hidden x length per
    token and pass (QK^T and PV, no causal saving). The vision tower (frozen, one forward) is
    left out."""
    tokens = seqs * length
    text = config.text
    return passes * (2.0 * llm_params(config) * tokens + 4.0 * text.num_layers * text.hidden_size * length * tokens)


def lora_config(cfg: Any) -> lora_lib.LoraConfig:
    targets = tuple(t.strip() for t in cfg.train.lora_targets.split(",") if t.strip())
    return lora_lib.LoraConfig(rank=cfg.train.lora_rank, alpha=cfg.train.lora_alpha, dropout=cfg.train.lora_dropout,
                               targets=targets)


# --------------------------------------------------------------------------- trees

def with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def follow_param_shardings(tree: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Optimiser-state shardings: a moment whose path ends with a param's path is placed like
    that param (same shape); everything else (counts) is replicated, as trainer.state_shardings."""
    by_path = {tuple(str(k) for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def pick(path, _):
        keys = tuple(str(k) for k in path)
        return next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), sharding.replicated(mesh))
    return jax.tree_util.tree_map_with_path(pick, tree)


# --------------------------------------------------------------------------- steps

@dataclasses.dataclass
class Context:
    """What every step builder gets: the run config, the mesh and the resolved models."""

    cfg: Any
    mesh: Mesh
    config: LlavaConfig  # the (policy) model, runtime knobs applied
    reward_config: LlavaConfig | None = None  # ppo: a separate reward/value base (ppo.reward_base), else None
    rollout_batch: int = 0  # ppo: prompts per generate call (0: ppo.rollout_chunk, else ppo.rollout_batch)


def _optimizer(cfg: Any) -> tuple[Any, Any]:
    from llava_jax.optim import OptimConfig, make_optimizer

    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else 1000  # the schedule does not change shapes
    return make_optimizer(OptimConfig(**{k: cfg.optim[k] for k in cfg.optim.keys()}), steps)


def _batch(mesh: Mesh, arrays: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in arrays.items()}


def train_batch(cfg: Any, config: LlavaConfig, mesh: Mesh) -> dict:
    """The largest batch the loader yields: global train.batch_size x data.max_length (the
    step splits it into train.grad_accum micro-batches itself)."""
    b, t, size = cfg.train.batch_size, cfg.data.max_length, config.vision.image_size
    pixels = ((b, size, size, config.vision.num_channels), jnp.float32)
    if cfg.stage == "rm":  # pairs: [B, 2, T], one image per pair
        return _batch(mesh, {"input_ids": ((b, 2, t), jnp.int32), "attention_mask": ((b, 2, t), jnp.int32),
                             "pixel_values": pixels, "choice": ((b,), jnp.int32), "hallucination": ((b,), jnp.int32),
                             "valid": ((b,), jnp.int32)})
    seq = {k: ((b, t), jnp.int32) for k in ("input_ids", "labels", "loss_mask", "attention_mask")}
    return _batch(mesh, {**seq, "pixel_values": pixels, "valid": ((b,), jnp.int32)})


def build_train_step(ctx: Context) -> Step:
    """sft_step / rm_step exactly as trainer.run jits them (same split, shardings, donation)."""
    from llava_jax.train_state import create_state
    from llava_jax.trainer import frozen_shardings, make_step, split_trainable, state_shardings

    cfg, config, mesh = ctx.cfg, ctx.config, ctx.mesh
    rng = jax.random.PRNGKey(cfg.seed)
    spec_box = {}

    def split():  # traced by eval_shape: the base and the new adapter/head are never materialised
        base = trainable.cast_tree(init_params(config, rng), jnp.dtype(cfg.model.param_dtype))
        spec_box["spec"], params, frozen = split_trainable(cfg, config, base, None, rng)
        return params, frozen

    params, frozen = jax.eval_shape(split)
    optimizer, schedule = _optimizer(cfg)
    state = jax.eval_shape(lambda p: create_state(p, optimizer, rng), params)
    state_sh, frozen_sh = state_shardings(config, state, mesh), frozen_shardings(config, frozen, mesh)
    state, frozen = with_shardings(state, state_sh), with_shardings(frozen, frozen_sh)
    fn = make_step(cfg, spec_box["spec"], optimizer, schedule, state_sh, frozen_sh)
    batch = train_batch(cfg, config, mesh)
    b, t = batch["input_ids"].shape[0], batch["input_ids"].shape[-1]
    note = f"batch {b}{' pairs' if cfg.stage == 'rm' else ''} x {t} tokens, grad_accum {cfg.train.grad_accum}"
    seqs = b * (2 if cfg.stage == "rm" else 1)
    return Step(f"{cfg.stage}_step", fn, (state, frozen, batch), params=(state.params, frozen), opt=state.opt_state,
                state_in_args=device_bytes((state.params, frozen, state.opt_state)), note=note,
                model_flops=step_flops(config, seqs, t))


def _adapters_over(base: dict, config: LlavaConfig, lcfg: lora_lib.LoraConfig, mesh: Mesh) -> dict:
    """A float32 adapter's params over `base`, with its shardings."""
    params = jax.eval_shape(lambda: lora_lib.init_adapter(base, lcfg, jax.random.PRNGKey(0), jnp.float32).params)
    logical = sharding.adapter_logical_axes(params, logical_axes(config))
    return with_shardings(params, sharding.shardings_for(params, logical, mesh))


def ppo_resident(ctx: Context) -> tuple[dict, dict]:
    """(params, optimiser state) PPO keeps on the devices, as ppo_trainer.load_roles lays
    them out: one policy base and, with ppo.reward_base, one reward base (param_dtype);
    float32 LoRA adapters policy and ref_policy over the policy base, value and reward over
    the reward base; float32 value and reward heads; AdamW over {policy, value, value head}."""
    mesh, lcfg = ctx.mesh, lora_config(ctx.cfg)
    policy_cfg, reward_cfg = ctx.config, ctx.reward_config or ctx.config
    placed = lambda c, tree: with_shardings(tree, sharding.param_shardings(c, tree, mesh))  # noqa: E731
    bases = {"policy_base": placed(policy_cfg, abstract_base(policy_cfg))}
    if ctx.reward_config is not None:
        bases["reward_base"] = placed(reward_cfg, abstract_base(reward_cfg))
    reward_base = bases.get("reward_base", bases["policy_base"])
    rep = sharding.replicated(mesh)
    head = jax.eval_shape(lambda: heads.init_head("value", reward_cfg.text.hidden_size))
    head = with_shardings(head, jax.tree_util.tree_map(lambda _: rep, head))
    adapters = {"policy": _adapters_over(bases["policy_base"], policy_cfg, lcfg, mesh),
                "ref_policy": _adapters_over(bases["policy_base"], policy_cfg, lcfg, mesh),
                "value": _adapters_over(reward_base, reward_cfg, lcfg, mesh),
                "reward": _adapters_over(reward_base, reward_cfg, lcfg, mesh)}
    trained = {"policy": adapters["policy"], "value": adapters["value"], "value_head": head}
    optimizer, _ = _optimizer(ctx.cfg)
    opt = jax.eval_shape(optimizer.init, trained)
    opt = with_shardings(opt, follow_param_shardings(opt, jax.tree_util.tree_map(lambda s: s.sharding, trained), mesh))
    return {**bases, "adapters": adapters, "heads": {"value": head, "reward": head}}, opt


def build_rollout(ctx: Context) -> Step:
    """The policy's rollout: `sampling.generate` (prefill + the lax.while_loop decode over the
    KV cache) compiled as ONE executable, as it runs; ppo.rollout_chunk (as the trainer:
    0 = all ppo.rollout_batch) prompts of max_query_tokens - 1 + image tokens, response_len
    new tokens."""
    from llava_jax.sampling import SamplingConfig, generate

    cfg, config, mesh = ctx.cfg, ctx.config, ctx.mesh
    params, opt = ppo_resident(ctx)
    base, adapter = params["policy_base"], params["adapters"]["policy"]
    lcfg = lora_config(cfg)
    b = ctx.rollout_batch or cfg.ppo.get("rollout_chunk", 0) or cfg.ppo.rollout_batch
    prompt = cfg.ppo.max_query_tokens - 1 + config.num_image_tokens  # the image counts as one query token
    sampling = SamplingConfig(max_new_tokens=cfg.ppo.response_len, temperature=cfg.ppo.temperature,
                              top_p=cfg.ppo.top_p, top_k=cfg.ppo.top_k, eos_id=config.text.eos_token_id,
                              cache_dtype=cfg.ppo.cache_dtype)
    size = config.vision.image_size
    batch = _batch(mesh, {"input_ids": ((b, prompt), jnp.int32), "attention_mask": ((b, prompt), jnp.int32),
                          "pixel_values": ((b, size, size, config.vision.num_channels), jnp.float32)})
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))

    def run(base, adapter_params, input_ids, attention_mask, pixel_values, rng):
        return generate(config, base, lora_lib.Adapter(adapter_params, lcfg), input_ids, attention_mask,
                        pixel_values, rng, sampling)

    args = (base, adapter, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], rng)
    fn = jax.jit(run, in_shardings=jax.tree_util.tree_map(lambda s: s.sharding, args))
    note = (f"generate: {b} prompts x {prompt} + {cfg.ppo.response_len} new tokens, "
            f"{cfg.ppo.cache_dtype} KV cache")
    return Step("rollout_generate", fn, args, params=params, opt=opt,
                state_in_args=device_bytes((base, adapter)), note=note,
                model_flops=step_flops(config, b, prompt + cfg.ppo.response_len, passes=1))


# The rating text the reward model reads after query and response (prompt + captions), in
# tokens: about 200 for the original's prompt and 5 captions; padded to reward_pad_multiple.
RATING_TOKENS = 256


def _ppo_trees(ctx: Context) -> tuple[Any, dict, dict, dict]:
    """(spec, trainable params, frozen trees, resident trees) as ppo_trainer.load_roles lays
    them out (`ppo_resident`)."""
    from llava_jax import roles

    lcfg = lora_config(ctx.cfg)
    policy_cfg, reward_cfg = ctx.config, ctx.reward_config or ctx.config
    resident, _ = ppo_resident(ctx)
    adapters, head_trees = resident["adapters"], resident["heads"]
    spec = roles.PPOSpec(policy_cfg, lcfg, reward_cfg, lcfg, lcfg, ctx.reward_config is None,
                         temperature=ctx.cfg.ppo.temperature)
    params = {"policy": adapters["policy"], "value": adapters["value"], "value_head": head_trees["value"]}
    frozen = {"policy_base": resident["policy_base"], "ref": adapters["ref_policy"], "reward": adapters["reward"],
              "reward_head": head_trees["reward"]}
    if "reward_base" in resident:
        frozen["reward_base"] = resident["reward_base"]
    return spec, params, frozen, resident


def _rollout_arrays(ctx: Context, rows: int) -> tuple[dict, int, int]:
    """(the rollout tensors of `rows` rollouts as the update and scoring passes read them,
    query length, response length)."""
    cfg, policy_cfg, reward_cfg = ctx.cfg, ctx.config, ctx.reward_config or ctx.config
    n = cfg.ppo.response_len
    q = cfg.ppo.max_query_tokens - 1 + policy_cfg.num_image_tokens
    feature_dtype = jnp.dtype(cfg.model.dtype)
    arrays = {"query_ids": ((rows, q), jnp.int32), "query_mask": ((rows, q), jnp.int32),
              "response": ((rows, n), jnp.int32), "response_mask": ((rows, n), jnp.bool_),
              "policy_features": ((rows, policy_cfg.num_image_tokens, policy_cfg.vision.hidden_size), feature_dtype)}
    if ctx.reward_config is not None:
        qv = q - policy_cfg.num_image_tokens + reward_cfg.num_image_tokens
        arrays.update(value_query_ids=((rows, qv), jnp.int32), value_query_mask=((rows, qv), jnp.int32),
                      reward_features=((rows, reward_cfg.num_image_tokens, reward_cfg.vision.hidden_size),
                                       feature_dtype))
    return arrays, q, n


def build_rollout_score(ctx: Context) -> Step:
    """The rollout's scoring pass as rollout.Rollouts jits it: reference log-probs, values and
    the reward model over `ppo.rollout_chunk` rollouts (the RM reads query + response + the
    rating text, RATING_TOKENS long, padded as the trainer pads it)."""
    from llava_jax.rollout import score_responses

    cfg, mesh = ctx.cfg, ctx.mesh
    spec, params, frozen, resident = _ppo_trees(ctx)
    _, opt = ppo_resident(ctx)
    b = ctx.rollout_batch or cfg.ppo.get("rollout_chunk", 0) or cfg.ppo.rollout_batch
    arrays, q, n = _rollout_arrays(ctx, b)
    multiple = cfg.ppo.reward_pad_multiple
    r = -(-(q - spec.policy_config.num_image_tokens + spec.reward_config.num_image_tokens + n + RATING_TOKENS)
          // multiple) * multiple
    arrays.update(reward_ids=((b, r), jnp.int32), reward_mask=((b, r), jnp.int32))
    if not spec.shared_base:
        size = spec.reward_config.vision.image_size
        arrays["reward_pixel_values"] = ((b, size, size, spec.reward_config.vision.num_channels), jnp.float32)
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    fn = jax.jit(functools.partial(score_responses, spec, cfg.ppo.old_logprobs != "recompute"),
                 in_shardings=(frozen_sh, None, None))
    args = (frozen, params, _batch(mesh, arrays))
    flops = 2 * step_flops(spec.policy_config, b, q + n, passes=1) + step_flops(spec.reward_config, b, r, passes=1)
    return Step("rollout_score", fn, args, params=resident, opt=opt,
                state_in_args=device_bytes((frozen, params)), note=f"{b} rollouts, reward inputs of {r} tokens",
                model_flops=flops)


def build_ppo_step(ctx: Context) -> Step:
    """The PPO update as ppo_trainer.run_ppo jits it (same spec, shardings, donation) on a
    minibatch of ppo.step_batch rollouts split into ppo.grad_accum micro-batches; the roles'
    trees are those `ppo_resident` lays out."""
    from llava_jax import ppo
    from llava_jax.ppo_trainer import ppo_hyper, roles_logical
    from llava_jax.train_state import create_state
    from llava_jax.trainer import state_shardings

    cfg, mesh = ctx.cfg, ctx.mesh
    spec, params, frozen, resident = _ppo_trees(ctx)
    optimizer, schedule = _optimizer(cfg)
    state = jax.eval_shape(lambda p: create_state(p, optimizer, jax.random.PRNGKey(0)), params)
    state_sh = state_shardings(spec.policy_config, state, mesh, logical=roles_logical(spec, params))
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    state = with_shardings(state, state_sh)
    fn = jax.jit(functools.partial(ppo.ppo_step, spec, ppo_hyper(cfg), optimizer, schedule),
                 in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
    s = cfg.ppo.step_batch
    arrays, q, n = _rollout_arrays(ctx, s)
    arrays.update({k: ((s, n), jnp.float32) for k in ("logprobs", "values", "advantages", "returns")})
    note = f"minibatch {s} rollouts x ({q} + {n}) tokens, grad_accum {cfg.ppo.grad_accum}"
    flops = step_flops(spec.policy_config, s, q + n) + step_flops(spec.reward_config, s, q + n)  # policy and value
    return Step("ppo_step", fn, (state, frozen, _batch(mesh, arrays)), params=resident,
                opt=state.opt_state, state_in_args=device_bytes((state.params, frozen, state.opt_state)), note=note,
                model_flops=flops)


STEP_BUILDERS: dict[str, Callable[[Context], Step]] = {
    "sft_step": build_train_step, "rm_step": build_train_step,
    "rollout_generate": build_rollout, "rollout_score": build_rollout_score, "ppo_step": build_ppo_step,
}


# ------------------------------------------------------------------------- compile

def check(cfg: Any, mesh: Mesh, *, model: str | None = None, reward_model: str | None = None,
          layers: int | None = None, rollout_batch: int = 0, steps: tuple[str, ...] | None = None,
          log: Callable[[str], None] = print) -> list[StepReport]:
    """Compiles every step of `cfg.stage` (or `steps`) for `mesh`; one report each."""
    config, source = resolve_model(cfg.model.init, model)
    config = with_runtime(cfg, config, layers)
    log(f"model: {source}; {config.text.num_layers} LLM layers{' (--layers)' if layers else ''}, "
        f"hidden {config.text.hidden_size}, {config.num_image_tokens} image tokens; dtype {cfg.model.dtype}, "
        f"params {cfg.model.param_dtype}, remat {cfg.model.remat}, attention {cfg.model.attention}")
    reward_config = None
    if cfg.stage == "ppo" and cfg.ppo.reward_base:
        reward_config, rsource = resolve_model(cfg.ppo.reward_base, reward_model)
        reward_config = with_runtime(cfg, reward_config, layers)
        log(f"reward base: {rsource}; {reward_config.text.num_layers} layers, hidden {reward_config.text.hidden_size}")
    ctx = Context(cfg, mesh, config, reward_config, rollout_batch)
    reports = []
    for name in steps or STAGE_STEPS[cfg.stage]:
        if name not in STEP_BUILDERS:
            raise ValueError(f"unknown step {name!r}; expected one of {sorted(STEP_BUILDERS)}")
        step = STEP_BUILDERS[name](ctx)
        log(f"{name}: compiling ({step.note}) ...")
        report = compile_step(step, mesh)
        reports.append(report)
        if report.error:
            log(f"{name}: the compiler refused it after {report.compile_seconds:.1f}s: {report.error}")
        else:
            log(f"{name}: compiled in {report.compile_seconds:.1f}s, {report.total / GiB:.3f} GiB per device")
    return reports
