"""Memory per device and compile time of every step of a stage, before any hardware.

Everything is abstract: parameters are `jax.eval_shape` trees (no weights), every argument
is a `ShapeDtypeStruct` carrying its `NamedSharding`, and each step is
`jax.jit(...).lower(...).compile()`-d for the requested mesh (`aot/report.py` reads
the result). The mesh is either a TPU slice's compile-only devices (`targets.py`: the real
TPU compiler, whose figures and out-of-memory refusals are what the chips will do), a GPU
host's compile-only devices (`targets.py`: XLA's CUDA compiler for sm_90, which compiles any
size, so fitting is our total against the device memory), or
forced host CPU devices (`--xla_force_host_platform_device_count`): XLA:CPU's buffer
assignment for the real shardings, an estimate only (other fusions and layouts, bf16 dots
in f32, no flash attention).

Steps per stage (`STAGE_STEPS`) are built by `STEP_BUILDERS[name](ctx) -> Step`, each
jitted exactly as the trainers jit it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llava_jax import sharding
from llava_jax.rl import setup as ppo_setup
from llava_jax.rl.batches import Prompts, Rollout
from llava_jax.train import setup as run_setup
from llava_jax.models import trainable
from llava_jax.aot.report import Step, StepReport, compile_step, device_bytes
from llava_jax.aot.targets import GiB
from llava_jax.train.metrics import transformer_train_flops
from llava_jax.models.clip import ClipVisionConfig
from llava_jax.models.llama import LlamaConfig
from llava_jax.models.llava import LlavaConfig, init_params, tiny_config
# apply_overrides (`--config.a.b=value` items onto a ConfigDict): the settings' one parser, re-exported.
from llava_jax.settings import RunSettings, apply_overrides, describe_cpu_shapes, resolve_cpu_shapes  # noqa: F401
from llava_jax.train.state import create_state

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
        from llava_jax.models.weights import load_config

        return load_config(init), f"{init}/config.json"
    guess = re.search(r"(?<![0-9])(7|13)b|tiny", init.lower())  # runs/tiny_sft/model: the tiny model
    if guess:
        return model_preset(guess.group(0)), f"preset {guess.group(0)} (no {init}/config.json; guessed from its path)"
    raise ValueError(f"no {init}/config.json and no size in its name: pass --model {'|'.join(MODEL_PRESETS)}")


def with_runtime(s: RunSettings, config: LlavaConfig, layers: int | None = None) -> LlavaConfig:
    """The run's dtype / param_dtype / remat / attention knobs, and optionally another LLM depth."""
    config = config.with_runtime(**s.model.runtime_knobs())
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
    """Model FLOPs of `seqs` sequences of `length` tokens through the LLM (metrics'
    transformer_train_flops): forward + backward (`passes` 3) or one forward (`passes` 1).
    The vision tower (frozen, one forward) is left out."""
    if passes not in (1, 3):
        raise ValueError(f"step_flops: passes={passes}; expected 1 (forward) or 3 (forward + backward)")
    text = config.text
    return transformer_train_flops(llm_params(config), seqs * length, text.num_layers, text.hidden_size, length,
                                   forward_only=passes == 1)


# --------------------------------------------------------------------------- steps

@dataclasses.dataclass
class Context:
    """What every step builder gets: the run settings, the mesh and the resolved models."""

    s: RunSettings
    mesh: Mesh
    config: LlavaConfig  # the (policy) model, runtime knobs applied
    reward_config: LlavaConfig | None = None  # ppo: a separate reward/value base (ppo.reward_base), else None
    rollout_batch: int = 0  # ppo: prompts per generate call (0: the run's ppo.rollout_chunk)

    @property
    def chunk(self) -> int:
        return self.rollout_batch or self.s.ppo.chunk


def _optimizer(s: RunSettings) -> tuple[Any, Any]:
    from llava_jax.train.optim import make_optimizer

    return make_optimizer(s.optim, s.train.max_steps if s.train.max_steps > 0 else 1000)  # shapes only


def _batch(mesh: Mesh, arrays: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in arrays.items()}


def train_batch(s: RunSettings, config: LlavaConfig, mesh: Mesh) -> dict:
    """The largest batch the loader yields (its dataset's Schema): global train.batch_size x
    data.max_length (the step splits it into train.grad_accum micro-batches itself)."""
    from llava_jax.data.datasets import PreferenceDataset, SFTDataset

    dataset = PreferenceDataset if s.stage == "rm" else SFTDataset
    size = config.vision.image_size
    schema = dataset.batch_schema(0, (size, size, config.vision.num_channels))
    return _batch(mesh, schema.batch_shapes(s.train.batch_size, s.data.max_length))


def build_train_step(ctx: Context) -> Step:
    """sft_step / rm_step exactly as the SFT/RM loop jits them (run_setup: same split,
    shardings, donation)."""
    s, config, mesh = ctx.s, ctx.config, ctx.mesh
    rng = jax.random.PRNGKey(s.seed)
    spec_box = {}

    def split():  # traced by eval_shape: the base and the new adapter/head are never materialised
        base = trainable.cast_tree(init_params(config, rng), jnp.dtype(s.model.param_dtype))
        spec_box["spec"], params, frozen = run_setup.split_trainable(s, config, base, None, rng)
        return params, frozen

    params, frozen = jax.eval_shape(split)
    optimizer, schedule = _optimizer(s)
    state = jax.eval_shape(lambda p: create_state(p, optimizer, rng), params)
    state_sh = run_setup.state_shardings(state, mesh, run_setup.params_logical(config, params))
    frozen_sh = run_setup.frozen_shardings(config, frozen, mesh)
    state, frozen = run_setup.with_shardings(state, state_sh), run_setup.with_shardings(frozen, frozen_sh)
    fn = run_setup.jit_train_step(s, spec_box["spec"], optimizer, schedule, state_sh, frozen_sh)
    batch = train_batch(s, config, mesh)
    b, t = batch["input_ids"].shape[0], batch["input_ids"].shape[-1]
    note = f"batch {b}{' pairs' if s.stage == 'rm' else ''} x {t} tokens, grad_accum {s.train.grad_accum}"
    seqs = b * (2 if s.stage == "rm" else 1)
    return Step(f"{s.stage}_step", fn, (state, frozen, batch), params=(state.params, frozen), opt=state.opt_state,
                state_in_args=device_bytes((state.params, frozen, state.opt_state)), note=note,
                model_flops=step_flops(config, seqs, t))


@dataclasses.dataclass
class PPOTrees:
    """The PPO roles as the PPO loop lays them out (ppo_setup.roles_trees), abstract and
    placed: trainable state (with AdamW moments) and frozen trees."""

    spec: Any
    state: Any
    frozen: dict

    @property
    def resident(self) -> tuple[Any, Any]:
        """(params, optimiser state) resident on the devices during the whole PPO run."""
        return (self.state.params, self.frozen), self.state.opt_state


def ppo_trees(ctx: Context) -> PPOTrees:
    """One policy base and, with ppo.reward_base, one reward base (param_dtype); LoRA
    adapters of train.lora_* for the four roles; value and reward heads; AdamW."""
    from llava_jax.models import heads, lora as lora_lib
    from llava_jax.rl import roles

    s, mesh, lcfg = ctx.s, ctx.mesh, ctx.s.train.lora_config()
    policy_cfg, reward_cfg = ctx.config, ctx.reward_config or ctx.config
    shared = ctx.reward_config is None

    def build():
        policy_base = trainable.cast_tree(init_params(policy_cfg, jax.random.PRNGKey(0)), policy_cfg.text.param_dtype)
        reward_base = policy_base if shared else trainable.cast_tree(
            init_params(reward_cfg, jax.random.PRNGKey(0)), reward_cfg.text.param_dtype)
        adapter = lambda base: lora_lib.init_adapter(base, lcfg, jax.random.PRNGKey(0), jnp.float32)  # noqa: E731
        head = heads.init_head("value", reward_cfg.text.hidden_size)
        return ppo_setup.roles_trees(policy_base, adapter(policy_base), adapter(reward_base), head, head,
                                     None if shared else reward_base)

    params, frozen = jax.eval_shape(build)
    spec = roles.PPOSpec(policy_cfg, lcfg, reward_cfg, lcfg, lcfg, shared, temperature=s.ppo.temperature)
    optimizer, _ = _optimizer(s)
    state = jax.eval_shape(lambda p: create_state(p, optimizer, jax.random.PRNGKey(0)), params)
    state = run_setup.with_shardings(state, ppo_setup.state_shardings(spec, state, mesh))
    frozen = run_setup.with_shardings(frozen, ppo_setup.frozen_shardings(spec, frozen, mesh))
    return PPOTrees(spec, state, frozen)


def build_rollout(ctx: Context) -> Step:
    """The policy's rollout pass as the PPO loop jits it (rollout.jit_generate: the policy tower
    once, `sampling.generate`'s prefill and lax.while_loop decode over the KV cache, the '?'
    cut) compiled as ONE executable; ppo.rollout_chunk prompts of max_query_tokens - 1 + image
    tokens, response_len new tokens."""
    from llava_jax.rl.rollout import jit_generate

    s, config, mesh = ctx.s, ctx.config, ctx.mesh
    trees = ppo_trees(ctx)
    b = ctx.chunk
    prompt = s.ppo.max_query_tokens - 1 + config.num_image_tokens  # the image counts as one query token
    sampling = ppo_setup.sampling_config(s.ppo, config.text.eos_token_id)
    size = config.vision.image_size
    arrays = {"query_ids": ((b, prompt), jnp.int32), "query_mask": ((b, prompt), jnp.int32),
              "pixel_values": ((b, size, size, config.vision.num_channels), jnp.float32),
              "length_bonus": ((b,), jnp.float32), "valid": ((b,), jnp.int32)}
    if ctx.reward_config is not None:  # the value base's view of the query (another tower's image layout)
        qv = prompt - config.num_image_tokens + ctx.reward_config.num_image_tokens
        arrays.update(value_query_ids=((b, qv), jnp.int32), value_query_mask=((b, qv), jnp.int32))
    prompts = Prompts(**_batch(mesh, arrays))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, trees.frozen)
    fn = jit_generate(trees.spec, sampling, QUESTION_MARK_IDS if s.ppo.cut_at_question_mark else (), frozen_sh)
    args = (trees.frozen, trees.state.params, prompts, rng)
    note = f"generate: {b} prompts x {prompt} + {s.ppo.response_len} new tokens, {s.ppo.cache_dtype} KV cache"
    params, opt = trees.resident
    return Step("rollout_generate", fn, args, params=params, opt=opt,
                state_in_args=device_bytes((trees.frozen, trees.state.params)),
                note=note, model_flops=step_flops(config, b, prompt + s.ppo.response_len, passes=1))


# The original's '?' cut tokens for LLaMA's tokenizer (rl.setup.question_mark_ids finds a run's own).
QUESTION_MARK_IDS = (1577, 29973)


# The rating text the reward model reads after query and response (prompt + captions), in
# tokens: about 200 for the original's prompt and 5 captions; padded to reward_pad_multiple.
RATING_TOKENS = 256


def _rollout_arrays(ctx: Context, rows: int) -> tuple[dict, int, int]:
    """(the rollout tensors of `rows` rollouts as the update and scoring passes read them,
    query length, response length)."""
    s, policy_cfg, reward_cfg = ctx.s, ctx.config, ctx.reward_config or ctx.config
    n = s.ppo.response_len
    q = s.ppo.max_query_tokens - 1 + policy_cfg.num_image_tokens
    feature_dtype = jnp.dtype(s.model.dtype)
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
    rating text, RATING_TOKENS long, padded as the PPO loop pads it)."""
    from llava_jax.rl.rollout import jit_score

    s, mesh = ctx.s, ctx.mesh
    trees = ppo_trees(ctx)
    spec = trees.spec
    b = ctx.chunk
    arrays, q, n = _rollout_arrays(ctx, b)
    arrays.pop("reward_features", None)  # the scoring pass computes them (the reward tower's pixels)
    multiple = s.ppo.reward_pad_multiple
    r = -(-(q - spec.policy_config.num_image_tokens + spec.reward_config.num_image_tokens + n + RATING_TOKENS)
          // multiple) * multiple
    reward = _batch(mesh, {"reward_ids": ((b, r), jnp.int32), "reward_mask": ((b, r), jnp.int32)})
    pixels = None
    if not spec.shared_base:
        size = spec.reward_config.vision.image_size
        pixels = _batch(mesh, {"p": ((b, size, size, spec.reward_config.vision.num_channels), jnp.float32)})["p"]
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, trees.frozen)
    fn = jit_score(spec, not s.ppo.recompute_old_logprobs, frozen_sh)
    args = (trees.frozen, trees.state.params, Rollout(**_batch(mesh, arrays)), reward["reward_ids"],
            reward["reward_mask"], pixels)
    flops = 2 * step_flops(spec.policy_config, b, q + n, passes=1) + step_flops(spec.reward_config, b, r, passes=1)
    params, opt = trees.resident
    return Step("rollout_score", fn, args, params=params, opt=opt,
                state_in_args=device_bytes((trees.frozen, trees.state.params)),
                note=f"{b} rollouts, reward inputs of {r} tokens", model_flops=flops)


def build_ppo_step(ctx: Context) -> Step:
    """The PPO update as the PPO loop jits it (ppo_setup.jit_ppo_step: same spec, shardings,
    donation) on a minibatch of ppo.step_batch rollouts split into ppo.grad_accum micro-batches."""
    s, mesh = ctx.s, ctx.mesh
    trees = ppo_trees(ctx)
    optimizer, schedule = _optimizer(s)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, trees.state)
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, trees.frozen)
    fn = ppo_setup.jit_ppo_step(trees.spec, ppo_setup.ppo_hyper(s.ppo), optimizer, schedule, state_sh, frozen_sh)
    rows = s.ppo.step_batch
    arrays, q, n = _rollout_arrays(ctx, rows)
    arrays.update({k: ((rows, n), jnp.float32) for k in ("logprobs", "values", "advantages", "returns")})

    note = f"minibatch {rows} rollouts x ({q} + {n}) tokens, grad_accum {s.ppo.grad_accum}"
    spec = trees.spec
    flops = step_flops(spec.policy_config, rows, q + n) + step_flops(spec.reward_config, rows, q + n)
    params, opt = trees.resident
    unchanged = jax.ShapeDtypeStruct((), jnp.bool_)
    return Step("ppo_step", fn, (trees.state, trees.frozen, Rollout(**_batch(mesh, arrays)), unchanged),
                params=params, opt=opt,
                state_in_args=device_bytes((trees.state.params, trees.frozen, trees.state.opt_state)), note=note,
                model_flops=flops)


STEP_BUILDERS: dict[str, Callable[[Context], Step]] = {
    "sft_step": build_train_step, "rm_step": build_train_step,
    "rollout_generate": build_rollout, "rollout_score": build_rollout_score, "ppo_step": build_ppo_step,
}


# ------------------------------------------------------------------------- compile

def check(s: RunSettings, mesh: Mesh, *, model: str | None = None, reward_model: str | None = None,
          layers: int | None = None, rollout_batch: int = 0, steps: tuple[str, ...] | None = None,
          log: Callable[[str], None] = print) -> list[StepReport]:
    """Compiles every step of `s.stage` (or `steps`) for `mesh`; one report each."""
    platform = mesh.devices.flat[0].platform  # the target's: "tpu" / "gpu" from a CPU host
    resolved = resolve_cpu_shapes(s, platform)
    log(describe_cpu_shapes(s.model.cpu_shapes, resolved.model.cpu_shapes, platform))
    s = resolved
    config, source = resolve_model(s.model.init, model)
    config = with_runtime(s, config, layers)
    log(f"model: {source}; {config.text.num_layers} LLM layers{' (--layers)' if layers else ''}, "
        f"hidden {config.text.hidden_size}, {config.num_image_tokens} image tokens; dtype {s.model.dtype}, "
        f"params {s.model.param_dtype}, remat {s.model.remat}, attention {s.model.attention}")
    reward_config = None
    if s.stage == "ppo" and s.ppo.reward_base:
        reward_config, rsource = resolve_model(s.ppo.reward_base, reward_model)
        reward_config = with_runtime(s, reward_config, layers)
        log(f"reward base: {rsource}; {reward_config.text.num_layers} layers, hidden {reward_config.text.hidden_size}")
    ctx = Context(s, mesh, config, reward_config, rollout_batch)
    reports = []
    for name in steps or STAGE_STEPS[s.stage]:
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
