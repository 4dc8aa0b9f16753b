"""The typed settings tree: every field a run reads, with its default, type and one-line doc,
held here once (frozen dataclasses; the machinery is in settings_read.py).

A config file's ConfigDict starts from these defaults (configs/common.py's `base_config()` is
generated from this tree) and is read once, at the entry (`load_settings`: the file, its
command-line overrides, `RunSettings.from_config`, then the path fields (`path=True`) made
absolute: relative ones from the file against its project root, the directory above its folder;
from the command line against the current directory), into the tree the rest of the code takes;
a lower layer takes the section it needs (`make_optimizer` the `optim` section,
`ppo_setup.ppo_hyper` the `ppo` one). Reading refuses, by name, a field that does
not exist (with the closest known ones) and a field the run's stage never reads set away from its
default (`stages=`), so no setting is silently ignored. Options are `Literal`s checked and lists
converted to tuples when a section is built; `validate` holds every check that needs no device.
`docs(RunSettings)` lists every field with its type, default, stages and doc.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal, Sequence, get_args

from llava_jax import settings_read
from llava_jax.settings_read import (Resolved, Section, describe_resolved, docs, load_config_file,  # noqa: F401
                                     path_problem, section, setting)  # (re-exported)

Stage = Literal["sft", "rm", "ppo"]  # pretrain is sft with trainable=projector and template=plain
CpuShapes = Literal["auto", "on", "off"]
Dtype = Literal["float32", "bfloat16", "float16"]  # models.layers.DTYPES
Remat = Literal["none", "full", "dots", "dots_no_batch"]  # models.layers.REMAT_POLICIES
Attention = Literal["xla", "flash"]  # models.llama.ATTENTION_BACKENDS
Trainable = Literal["projector", "projector+llm", "lora", "lora+projector"]
Schedule = Literal["cosine", "constant", "linear"]
Template = Literal["vicuna_v1", "v1", "llava_v1", "plain"]  # data.templates' registry
KLEstimator = Literal["k1", "k1_unclamped", "k3"]
ScheduleUnit = Literal["rollout", "update"]
OldLogprobs = Literal["recompute", "sampler"]

STAGES: tuple[str, ...] = get_args(Stage)
CPU_SHAPES: tuple[str, ...] = get_args(CpuShapes)
TRAINABLE: tuple[str, ...] = get_args(Trainable)
SFT_RM = ("sft", "rm")
# The base parts each train.trainable mode trains in full (LoRA adapters aside).
_TRAINABLE_PARTS = {"projector": ("projector",), "projector+llm": ("projector", "llm"), "lora": (),
                    "lora+projector": ("projector",)}


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    PATH = "config.model"
    init: str = setting("tiny", '"tiny" (random tiny LLaVA) or a converted checkpoint directory', path=True,
                        not_paths=("tiny",))
    adapter: str = setting("", 'adapter inside model.init to start from ("" = none)', stages=SFT_RM)
    dtype: Dtype = setting("float32", "compute dtype")
    param_dtype: Dtype = setting("float32", "dtype of the frozen base on device")
    remat: Remat = setting("none", "rematerialisation policy of the scanned layers")
    attention: Attention = setting("xla", "whole-sequence attention of the training and scoring passes (flash: "
                                   "Pallas splash on TPU, cuDNN on GPU, Pallas interpret mode on CPU for checking "
                                   "only); the sampler stays on XLA")
    cpu_shapes: CpuShapes = setting("auto", "the forms XLA:CPU runs faster (folded query groups in attention, "
                                    "unstacked decode layers); auto: on iff the run's devices (a compile check: its "
                                    "target's) are CPUs. Decided once at the start of a run, which prints it")

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
class TrainSettings(Section):
    PATH = "config.train"
    trainable: Trainable = setting("projector+llm", "what trains: the projector, projector + LLM, a LoRA adapter, "
                                   "or LoRA + projector (the vision tower stays frozen)")
    lora_rank: int = setting(64, "LoRA rank")
    lora_alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input (0 in PPO)")
    lora_targets: tuple[str, ...] = setting(("q", "k", "v", "o", "gate", "up", "down"),
                                            "the LLM projections LoRA adapts (a comma-separated string or a list)")
    batch_size: int = setting(128, "global batch (all processes and accumulation steps)", stages=SFT_RM)
    grad_accum: int = setting(1, "micro-batches per SFT step", stages=("sft",), unread={
        "rm": "the RM step takes whole batches (its centering term is a batch mean); lower train.batch_size or "
              "use more devices instead",
        "ppo": "PPO splits its minibatches by ppo.grad_accum; set that instead"})
    num_epochs: float = setting(1.0, "passes over the data (PPO: over the prompts)")
    max_steps: int = setting(-1, "> 0: stop after this many steps (e.g. RM early stop at 200)")

    @property
    def uses_lora(self) -> bool:
        """Whether a LoRA adapter trains."""
        return self.trainable in ("lora", "lora+projector")

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """The base parts trained in full (LoRA aside): () / ("projector",) / ("projector", "llm")."""
        return _TRAINABLE_PARTS[self.trainable]

    def lora_config(self) -> Any:
        from llava_jax.models.lora import LoraConfig  # the one upward reference: a call, not an import-time one

        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)


@dataclasses.dataclass(frozen=True)
class OptimSettings(Section):
    """AdamW with a linear warmup, then the schedule's shape, and global-norm clipping
    (train/optim.py; `OptimConfig` there is this section)."""
    PATH = "config.optim"
    learning_rate: float = setting(2e-5, "peak learning rate")
    schedule: Schedule = setting("cosine", "shape after the warmup (linear: decay to 0)")
    warmup_ratio: float = setting(0.03, "warmup as a fraction of the total steps")
    warmup_steps: int = setting(0, "> 0: absolute warmup steps (wins over warmup_ratio)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "global-norm gradient clipping (0: none)")
    b1: float = setting(0.9, "AdamW beta1")
    b2: float = setting(0.999, "AdamW beta2")
    eps: float = setting(1e-8, "AdamW epsilon")


@dataclasses.dataclass(frozen=True)
class DataSettings(Section):
    PATH = "config.data"
    train: str = setting("", "JSON/JSONL in the LLaVA(-RLHF) format of the stage", path=True)
    image_folder: str = setting("", "directory the records' image paths are relative to", path=True)
    captions: str = setting("", "image -> captions JSON (rm with facts, ppo)", stages=("rm", "ppo"), path=True)
    tokenizer: str = setting("", "HF tokenizer directory", path=True)
    template: Template = setting("vicuna_v1", "conversation template")
    max_length: int = setting(1280, "tokens, image placeholders included", stages=SFT_RM)
    num_buckets: int = setting(3, "static sequence lengths (halving down from max_length)", stages=SFT_RM)
    workers: int = setting(2, "image-decoding threads per process")
    eval_size: int = setting(0, "records held out from data.train for evaluation", stages=SFT_RM, unread={
        "ppo": "PPO holds no prompts out (its held-out evaluation is eval.toy_dir or scripts/generate.py); "
               "set it to 0"})
    strict: bool = setting(False, "bad records: raise instead of skip-and-count")


@dataclasses.dataclass(frozen=True)
class RMSettings(Section):
    PATH = "config.rm"
    STAGES = ("rm",)
    centering: float = setting(1e-3, "weight of |mean(r_chosen + r_rejected)|")
    with_facts: bool = setting(True, 'captions inside the "accurate" criterion (Fact-RLHF)')
    prompt_file: str = setting("", 'reward prompt wording ("" = llava_jax/data/prompts/fact_rlhf_reward.txt)',
                               stages=("rm", "ppo"), path=True)
    eval_every: int = setting(50, "steps between held-out evaluations")


@dataclasses.dataclass(frozen=True)
class PPOSettings(Section):
    PATH = "config.ppo"
    STAGES = ("ppo",)
    policy_adapter: str = setting("", "policy-init adapter dir (a LoRA SFT run's workdir/adapter); "
                                  '"" = fresh LoRA = base', path=True)
    reward_base: str = setting("", 'checkpoint dir of the reward/value base ("" = model.init, one shared base)',
                               path=True)
    reward_adapter: str = setting("", "the RM run's adapter dir (LoRA + reward head); value starts from it",
                                  path=True)
    rollout_batch: int = setting(512, "prompts sampled per PPO step (global)")
    rollout_chunk: int = setting(0, "prompts sampled and scored per jitted pass (0 = the whole rollout batch)")
    step_batch: int = setting(256, "rollouts per optimiser step (global)")
    grad_accum: int = setting(1, "micro-batches per optimiser step")
    ppo_epochs: int = setting(2, "passes over each rollout batch")
    max_query_tokens: int = setting(128, "longer prompts are dropped (image counted as one token)")
    response_len: int = setting(896, "max new tokens")
    temperature: float = setting(1.0, "rollout sampling temperature")
    top_p: float = setting(1.0, "rollout nucleus sampling (1: off)")
    top_k: int = setting(0, "rollout top-k sampling (0: off)")
    cache_dtype: Dtype = setting("bfloat16", "KV cache of the rollout sampler")
    with_facts: bool = setting(True, "captions inside the reward prompt (Fact-RLHF)")
    rm_weight: float = setting(1.0, "multiplier of the reward model's score (0: symbolic rewards only)")
    correct_bonus: float = setting(2.0, 'x correctness (multiple choice 1/0, yes/no-"No" +-0.5)')
    length_bonus: float = setting(-10.0, "x response length / response_len x item length_bonus")
    no_stop_penalty: float = setting(-8.0, "added when the response did not end with EOS")
    kl_estimator: KLEstimator = setting("k1", "k1 (clamped at 0, as the original) | k1_unclamped | k3")
    kl_coef: float = setting(0.1, "initial (or fixed) KL coefficient")
    adaptive_kl: bool = setting(False, "proportional controller towards target_kl (Ziegler et al.)")
    target_kl: float = setting(6.0, "per-sequence KL the adaptive controller aims at")
    kl_horizon: int = setting(10000, "adaptive controller horizon (rollouts)")
    reward_scale: float = setting(10.0, "shaped rewards x this (when not whitened)")
    whiten_rewards: bool = setting(False, "whiten shaped rewards (no mean shift) instead of scaling")
    gamma: float = setting(1.0, "GAE discount")
    lam: float = setting(1.0, "GAE lambda")
    clip: float = setting(0.2, "policy ratio clip")
    value_clip: float = setting(0.2, "value clip")
    vf_coef: float = setting(0.1, "value loss weight")
    # Fidelity to the original LLaVA-RLHF PPO (README "PPO: where we differ from the original").
    # The defaults reproduce it; the tiny configs choose the alternatives we think better.
    whiten_over_pads: bool = setting(True, "advantages: the score on the tensor's last position, GAE through the "
                                     "pads and whitening statistics over every [batch, response_len] position, pads "
                                     "included (the original; a pad's advantage is reward_scale x score - V(pad), and "
                                     "at the published shapes the pads outnumber the tokens, so the statistics follow "
                                     "the pads). False: the episode ends at the last valid token, statistics over "
                                     "valid tokens only")
    loss_over_pads: bool = setting(True, "policy and value losses as means over every position (the original: much "
                                   "of the value gradient fits V(pad), and the pads dilute the policy gradient). "
                                   "False: means over valid tokens")
    cut_at_question_mark: bool = setting(True, "cut each response after its first '?' token (LLaMA ids 1577 / 29973, "
                                         "as the original): its EOS is gone, so the no-stop penalty applies. False: "
                                         "responses end at EOS only")
    lr_schedule_unit: ScheduleUnit = setting("rollout", "rollout: the schedule steps once per PPO step (the "
                                             "original: warmup counts rollouts and the whole first rollout trains at "
                                             "lr 0) | update: once per optimiser update")
    old_logprobs: OldLogprobs = setting("recompute", "recompute: PPO's old log-probs from a teacher-forced policy "
                                        "pass (the original; the first update's ratio is exactly 1 in any dtype) | "
                                        "sampler: the sampler's (one pass fewer; equal in float32 only)")
    reward_pad_multiple: int = setting(64, "reward-model inputs padded to a multiple of this (few compiles)")
    export_merged: bool = setting(False, "also write the policy merged into the base as an HF model "
                                  "(workdir/hf_merged)")

    @property
    def chunk(self) -> int:
        """Prompts per jitted rollout pass (global)."""
        return self.rollout_chunk or self.rollout_batch

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.rollout_batch // self.step_batch)

    @property
    def recompute_old_logprobs(self) -> bool:
        """Old log-probs (and values) from a teacher-forced pass, not the sampler's."""
        return self.old_logprobs == "recompute"


@dataclasses.dataclass(frozen=True)
class EvalSettings(Section):
    PATH = "config.eval"
    STAGES = ("ppo",)
    toy_dir: str = setting("", "toy world (data/toy): PPO logs the rollouts' hallucination_rate and ends with a greedy "
                           'held-out evaluation of the SFT and PPO policies (llava_jax/eval/toy_eval.py); "" = off',
                           path=True)
    batch_size: int = setting(64, "questions per generate call in that evaluation")


@dataclasses.dataclass(frozen=True)
class MeshSettings(Section):
    PATH = "config.mesh"
    data: int = setting(1, "data-parallel axis size")
    fsdp: int = setting(-1, "fully sharded data-parallel axis size (-1: all remaining devices)")
    tensor: int = setting(1, "tensor-parallel axis size")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Section):
    PATH = "config.checkpoint"
    every: int = setting(100, "steps between checkpoints")
    keep: int = setting(3, "checkpoints kept")
    async_save: bool = setting(True, "write checkpoints in the background")


@dataclasses.dataclass(frozen=True)
class LogSettings(Section):
    PATH = "config.log"
    every: int = setting(1, "steps between metrics lines (PPO: rollout samples)")
    tensorboard: bool = setting(True, "also write TensorBoard events (workdir/tb)")
    peak_tflops: float = setting(0.0, "per device, for MFU (0: look up the device kind)", stages=SFT_RM)


@dataclasses.dataclass(frozen=True)
class RunSettings(Section):
    PATH = "config"
    stage: Stage = setting("sft", "sft | rm | ppo (pretrain is sft with trainable=projector and template=plain)")
    seed: int = setting(0, "model init, data order, dropout")
    workdir: str = setting("runs/default", "checkpoints/, metrics.jsonl and tb/ go here", path=True)
    resume: bool = setting(True, "continue from the latest checkpoint in workdir")
    requires: tuple[str, ...] = setting((), "config files run first when their workdir has no exported result "
                                        "(a comma-separated string or a list)", path=True)
    model: ModelSettings = section(ModelSettings, "the model and its runtime knobs")
    train: TrainSettings = section(TrainSettings, "what trains, LoRA, batch and length of the run")
    optim: OptimSettings = section(OptimSettings, "optimiser and learning-rate schedule")
    data: DataSettings = section(DataSettings, "training data and its loader")
    rm: RMSettings = section(RMSettings, "reward-model training")
    ppo: PPOSettings = section(PPOSettings, "PPO: roles, rollouts, rewards, loss")
    eval: EvalSettings = section(EvalSettings, "PPO's evaluation on the toy world")
    mesh: MeshSettings = section(MeshSettings, "device mesh")
    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoints")
    log: LogSettings = section(LogSettings, "metrics")

    @classmethod
    def from_config(cls, cfg: Any) -> RunSettings:
        """The settings of a ConfigDict (or any mapping of mappings; a field left out keeps its
        default): unknown fields and fields the stage does not read are refused by name."""
        s = settings_read.read(cls, cfg, "config")
        settings_read.refuse_unread(s, s.stage)
        return s

    def required_configs(self) -> list[str]:
        return list(self.requires)


def base_config() -> Any:
    """The tree's defaults as the ConfigDict that config files and `--config.a.b=value` override
    (lists as comma strings, the command line's form)."""
    return settings_read.as_config_dict(RunSettings())


def unknown_field(dotted: str) -> str | None:
    """None when `dotted` (e.g. "train.batch_size") names a setting; else a one-line error
    naming it and the closest valid ones."""
    return settings_read.unknown_field(RunSettings, dotted)


def apply_overrides(cfg: Any, items: list[str]) -> None:
    """`--config.a.b=value` items applied to a ConfigDict, as scripts/train.py accepts them."""
    settings_read.apply_overrides(cfg, items, unknown_field)


def load_settings(config_file: str, overrides: Sequence[str] = ()) -> tuple[RunSettings, list[Resolved]]:
    """The settings of a config file and its `--config.a.b=value` overrides, read once, with every
    relative path field made absolute by the one rule: written in the file, against the file's
    project root (the directory above its folder: the repository for configs/*.py); given on the
    command line, against the current directory. Also what was resolved (`describe_resolved`)."""
    cfg = load_config_file(config_file)
    apply_overrides(cfg, list(overrides))
    s = RunSettings.from_config(cfg)
    return settings_read.resolve_paths(s, config_file, settings_read.override_fields(overrides), os.getcwd())


# ------------------------------------------------------------------------ validation

def validate(s: RunSettings, process_count: int, device_count: int) -> None:
    """Everything that can be checked before touching a device, with one clear error each
    (types and options were checked when the settings were built)."""
    from llava_jax import sharding

    settings_read.refuse_unread(s, s.stage)  # settings built by replace() rather than read
    if s.stage == "rm" and not s.train.uses_lora:
        raise ValueError("config.train.trainable: the reward model trains a LoRA adapter (lora or lora+projector)")
    for name in ("train", "tokenizer"):
        path = getattr(s.data, name)
        if not path or not os.path.exists(path):
            raise ValueError(path_problem(f"config.data.{name}", path, " does not exist"))
    if s.data.image_folder and not os.path.isdir(s.data.image_folder):
        raise ValueError(path_problem("config.data.image_folder", s.data.image_folder, " is not a directory"))
    if s.stage == "rm" and s.rm.with_facts and not os.path.isfile(s.data.captions):
        raise ValueError(path_problem("config.data.captions", s.data.captions,
                                      ": rm.with_facts needs the captions file"))
    if s.rm.prompt_file and not os.path.isfile(s.rm.prompt_file):
        raise ValueError(path_problem("config.rm.prompt_file", s.rm.prompt_file, " does not exist"))
    if s.model.init != "tiny" and not os.path.isdir(s.model.init):
        raise ValueError(path_problem("config.model.init", s.model.init, ": expected 'tiny' or a checkpoint directory"))
    if s.stage != "ppo" and (s.train.batch_size <= 0 or s.train.batch_size % (s.train.grad_accum * process_count)):
        raise ValueError(f"config.train.batch_size={s.train.batch_size} must divide into grad_accum="
                         f"{s.train.grad_accum} x {process_count} processes")
    sharding.mesh_shape(s.mesh.shape, device_count)
    if s.stage == "ppo":
        _validate_ppo(s, process_count)


def _validate_ppo(s: RunSettings, procs: int) -> None:
    p = s.ppo
    if not p.reward_adapter or not os.path.isdir(p.reward_adapter):
        raise ValueError(path_problem("config.ppo.reward_adapter", p.reward_adapter, ": the reward model's adapter "
                                      "directory (an RM run's workdir/adapter) does not exist"))
    if p.policy_adapter and not os.path.isdir(p.policy_adapter):
        raise ValueError(path_problem("config.ppo.policy_adapter", p.policy_adapter,
                                      " does not exist ('' = fresh LoRA)"))
    if p.reward_base and not os.path.isdir(p.reward_base):
        raise ValueError(path_problem("config.ppo.reward_base", p.reward_base, " does not exist ('' = model.init)"))
    if p.with_facts and not os.path.isfile(s.data.captions):
        raise ValueError(path_problem("config.data.captions", s.data.captions,
                                      ": ppo.with_facts needs the captions file"))
    if s.eval.toy_dir and not os.path.isdir(s.eval.toy_dir):
        raise ValueError(path_problem("config.eval.toy_dir", s.eval.toy_dir, " is not a directory ('' = off)"))
    if s.train.trainable != "lora":
        raise ValueError("config.train.trainable: PPO trains LoRA adapters (lora)")
    if s.train.lora_dropout:
        raise ValueError(f"config.train.lora_dropout={s.train.lora_dropout}: PPO runs its adapters without "
                         "dropout (the rollout's log-probs and the update must see one policy); set it to 0")
    if p.rollout_batch % p.step_batch or p.step_batch % (p.grad_accum * procs):
        raise ValueError(f"config.ppo: rollout_batch={p.rollout_batch} must be a multiple of step_batch="
                         f"{p.step_batch}, itself a multiple of grad_accum={p.grad_accum} x {procs} processes")
    if p.rollout_batch % p.chunk or p.chunk % procs:
        raise ValueError(f"config.ppo.rollout_chunk={p.chunk} must divide rollout_batch={p.rollout_batch} and be a "
                         f"multiple of {procs} processes")
