"""Typed run settings: the config file's ConfigDict is read once, at the entry
(`RunSettings.from_config`), into frozen dataclasses that the rest of the code takes.

The field names and defaults live in `configs/common.py` only (the single source of knobs);
here each section lists the fields llava_jax reads, with their types. A config field this
module does not know is rejected with an error naming it and the closest known fields, so
no setting is silently ignored. `validate` holds every check that needs no device.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import typing
from typing import Any

from llava_jax.train.optim import OptimConfig

STAGES = ("sft", "rm", "ppo")
CPU_SHAPES = ("auto", "on", "off")
TRAINABLE = ("projector", "projector+llm", "lora", "lora+projector")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    init: str
    adapter: str
    dtype: str
    param_dtype: str
    remat: str
    attention: str
    cpu_shapes: str  # auto | on | off; see resolve_cpu_shapes

    def runtime_knobs(self) -> dict[str, Any]:
        """The model's runtime knobs (LlavaConfig.with_runtime). A `cpu_shapes` still "auto" here
        (settings that did not pass an entry's `resolve_cpu_shapes`, e.g. a test's) is decided
        by the default backend."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat,
                    attention=self.attention, cpu_shapes=cpu_shapes_on(self.cpu_shapes, default_platform()))


def default_platform() -> str:
    import jax

    return jax.default_backend()


def cpu_shapes_on(choice: str, platform: str) -> bool:
    """`model.cpu_shapes` for a run on `platform`'s devices: "on", "off", or "auto" (on iff
    they are CPUs). The one place the backend decides a model's shapes."""
    if choice not in CPU_SHAPES:
        raise ValueError(f"config.model.cpu_shapes={choice!r}: expected one of {CPU_SHAPES}")
    return choice == "on" or (choice == "auto" and platform == "cpu")


def resolve_cpu_shapes(s: RunSettings, platform: str) -> RunSettings:
    """`s` with `model.cpu_shapes` decided ("on" / "off") for a run on `platform`'s devices."""
    value = "on" if cpu_shapes_on(s.model.cpu_shapes, platform) else "off"
    return s.replace(model={"cpu_shapes": value})


def describe_cpu_shapes(before: str, after: str, platform: str) -> str:
    """The line a run prints at its start."""
    how = f"{before} on {platform} devices" if before == "auto" else "as set"
    return f"model.cpu_shapes: {after} ({how})"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    trainable: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    batch_size: int
    grad_accum: int
    num_epochs: float
    max_steps: int

    def lora_config(self) -> Any:
        from llava_jax.models.lora import LoraConfig

        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train: str
    image_folder: str
    captions: str
    tokenizer: str
    template: str
    max_length: int
    num_buckets: int
    workers: int
    eval_size: int
    strict: bool


@dataclasses.dataclass(frozen=True)
class RMSettings:
    centering: float
    with_facts: bool
    prompt_file: str
    eval_every: int


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    policy_adapter: str
    reward_base: str
    reward_adapter: str
    rollout_batch: int
    rollout_chunk: int
    step_batch: int
    grad_accum: int
    ppo_epochs: int
    max_query_tokens: int
    response_len: int
    temperature: float
    top_p: float
    top_k: int
    cache_dtype: str
    with_facts: bool
    rm_weight: float
    correct_bonus: float
    length_bonus: float
    no_stop_penalty: float
    kl_estimator: str
    kl_coef: float
    adaptive_kl: bool
    target_kl: float
    kl_horizon: int
    reward_scale: float
    whiten_rewards: bool
    gamma: float
    lam: float
    clip: float
    value_clip: float
    vf_coef: float
    whiten_over_pads: bool
    loss_over_pads: bool
    cut_at_question_mark: bool
    lr_schedule_unit: str
    old_logprobs: str
    reward_pad_multiple: int
    export_merged: bool

    @property
    def chunk(self) -> int:
        """Prompts per jitted rollout pass (global)."""
        return self.rollout_chunk or self.rollout_batch

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.rollout_batch // self.step_batch)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    toy_dir: str
    batch_size: int


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data: int
    fsdp: int
    tensor: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every: int
    keep: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class LogSettings:
    every: int
    tensorboard: bool
    peak_tflops: float


@dataclasses.dataclass(frozen=True)
class RunSettings:
    stage: str
    seed: int
    workdir: str
    resume: bool
    requires: str
    model: ModelSettings
    train: TrainSettings
    optim: OptimConfig
    data: DataSettings
    rm: RMSettings
    ppo: PPOSettings
    eval: EvalSettings
    mesh: MeshSettings
    checkpoint: CheckpointSettings
    log: LogSettings

    @classmethod
    def from_config(cls, cfg: Any) -> RunSettings:
        """The settings of a ConfigDict (or any mapping of mappings) built from configs/common.py."""
        return _read(cls, cfg, "config")

    def required_configs(self) -> list[str]:
        return [p.strip() for p in self.requires.split(",") if p.strip()]

    def replace(self, **sections: Any) -> RunSettings:
        """A copy with some fields replaced; `replace(train={"max_steps": 3})` edits inside a section."""
        out = {}
        for name, value in sections.items():
            current = getattr(self, name)
            out[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **out)


def _field_names(cls: type, prefix: str = "") -> list[str]:
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names += _field_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


def _coerce(kind: type, value: Any, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected True or False")
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where}={value!r}: expected a number ({kind.__name__})")
    if kind is int and not isinstance(value, int):
        raise ValueError(f"{where}={value!r}: expected an integer")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where}={value!r}: expected a string")
    return kind(value)


def _read(cls: type, node: Any, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
            raise ValueError(f"{where}.{key}: no such setting (llava_jax reads no such field)"
                             + (f"; closest: {', '.join(f'{where}.{c}' for c in close)}" if close else ""))
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in node:
            if f.default is not dataclasses.MISSING:
                continue
            raise ValueError(f"{where}.{f.name}: missing (configs start from configs/common.py's base_config())")
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = _read(kind, node[f.name], f"{where}.{f.name}")
        else:
            values[f.name] = _coerce(kind, node[f.name], f"{where}.{f.name}")
    return cls(**values)


# ---------------------------------------------------------------------- config files

def load_config_file(path: str) -> Any:
    """`get_config()` of a config file (as `--config FILE` does, without overrides)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_llava_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def unknown_field(dotted: str) -> str | None:
    """None when `dotted` (e.g. "train.batch_size") names a setting; else a one-line error
    naming it and the closest valid ones."""
    fields = _field_names(RunSettings)
    if dotted in fields:
        return None
    close = difflib.get_close_matches(dotted, fields, n=3, cutoff=0.5)
    return f"--config.{dotted}: no such config field" + (f"; closest: {', '.join(close)}" if close else "")


# ------------------------------------------------------------------------ validation

def validate(s: RunSettings, process_count: int, device_count: int) -> None:
    """Everything that can be checked before touching a device, with one clear error each."""
    from llava_jax import sharding

    if s.stage not in STAGES:
        raise ValueError(f"config.stage={s.stage!r}: expected one of {STAGES}")
    if s.model.cpu_shapes not in CPU_SHAPES:
        raise ValueError(f"config.model.cpu_shapes={s.model.cpu_shapes!r}: expected one of {CPU_SHAPES}")
    if s.train.trainable not in TRAINABLE:
        raise ValueError(f"config.train.trainable={s.train.trainable!r}: expected one of {TRAINABLE}")
    if s.stage == "rm" and not s.train.trainable.startswith("lora"):
        raise ValueError("config.train.trainable: the reward model trains a LoRA adapter (lora or lora+projector)")
    for name in ("train", "tokenizer"):
        path = getattr(s.data, name)
        if not path or not os.path.exists(path):
            raise ValueError(f"config.data.{name}={path!r} does not exist")
    if s.data.image_folder and not os.path.isdir(s.data.image_folder):
        raise ValueError(f"config.data.image_folder={s.data.image_folder!r} is not a directory")
    if s.stage == "rm" and s.rm.with_facts and not os.path.isfile(s.data.captions):
        raise ValueError(f"config.data.captions={s.data.captions!r}: rm.with_facts needs the captions file")
    if s.model.init != "tiny" and not os.path.isdir(s.model.init):
        raise ValueError(f"config.model.init={s.model.init!r}: expected 'tiny' or a checkpoint directory")
    if s.train.batch_size <= 0 or s.train.batch_size % (s.train.grad_accum * process_count):
        raise ValueError(f"config.train.batch_size={s.train.batch_size} must divide into grad_accum="
                         f"{s.train.grad_accum} x {process_count} processes")
    if s.stage == "rm" and s.train.grad_accum != 1:
        raise ValueError(f"config.train.grad_accum={s.train.grad_accum}: the RM step takes whole batches (its "
                         "centering term is a batch mean); lower train.batch_size or use more devices instead")
    sharding.mesh_shape(s.mesh.shape, device_count)
    if s.stage == "ppo":
        _validate_ppo(s, process_count)


def _validate_ppo(s: RunSettings, procs: int) -> None:
    from llava_jax.rl.ppo import PPOHyper

    p = s.ppo
    if not p.reward_adapter or not os.path.isdir(p.reward_adapter):
        raise ValueError(f"config.ppo.reward_adapter={p.reward_adapter!r}: the reward model's adapter directory "
                         "(an RM run's workdir/adapter) does not exist")
    if p.policy_adapter and not os.path.isdir(p.policy_adapter):
        raise ValueError(f"config.ppo.policy_adapter={p.policy_adapter!r} does not exist ('' = fresh LoRA)")
    if p.reward_base and not os.path.isdir(p.reward_base):
        raise ValueError(f"config.ppo.reward_base={p.reward_base!r} does not exist ('' = model.init)")
    if p.with_facts and not os.path.isfile(s.data.captions):
        raise ValueError(f"config.data.captions={s.data.captions!r}: ppo.with_facts needs the captions file")
    if s.train.trainable != "lora":
        raise ValueError("config.train.trainable: PPO trains LoRA adapters (lora)")
    if s.train.lora_dropout:
        raise ValueError(f"config.train.lora_dropout={s.train.lora_dropout}: PPO runs its adapters without "
                         "dropout (the rollout's log-probs and the update must see one policy); set it to 0")
    if s.train.grad_accum != 1:
        raise ValueError(f"config.train.grad_accum={s.train.grad_accum}: PPO splits its minibatches by "
                         "ppo.grad_accum; set that instead")
    if s.data.eval_size:
        raise ValueError(f"config.data.eval_size={s.data.eval_size}: PPO holds no prompts out (its held-out "
                         "evaluation is eval.toy_dir or scripts/generate.py); set it to 0")
    if p.rollout_batch % p.step_batch or p.step_batch % (p.grad_accum * procs):
        raise ValueError(f"config.ppo: rollout_batch={p.rollout_batch} must be a multiple of step_batch="
                         f"{p.step_batch}, itself a multiple of grad_accum={p.grad_accum} x {procs} processes")
    if p.rollout_batch % p.chunk or p.chunk % procs:
        raise ValueError(f"config.ppo.rollout_chunk={p.chunk} must divide rollout_batch={p.rollout_batch} and be a "
                         f"multiple of {procs} processes")
    PPOHyper(kl_estimator=p.kl_estimator)
    if p.lr_schedule_unit not in ("rollout", "update"):
        raise ValueError(f"config.ppo.lr_schedule_unit={p.lr_schedule_unit!r}: expected 'rollout' or 'update'")
    if p.old_logprobs not in ("recompute", "sampler"):
        raise ValueError(f"config.ppo.old_logprobs={p.old_logprobs!r}: expected 'recompute' or 'sampler'")
