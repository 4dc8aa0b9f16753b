"""The settings tree (llava_jax/settings.py) is the one place of every field's default, type and
doc: configs/common.py's ConfigDict is the tree, the step functions' structs take every field the
tree holds from it and hold no default of their own, options are checked and lists converted
once, and a field the run's stage does not read, set away from its default, is refused by name."""
import dataclasses
import glob
import os
import subprocess
import sys
import typing

import pytest

from configs.common import base_config
from llava_jax import settings, settings_read
from llava_jax.settings import PPOSettings, RunSettings, apply_overrides, load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _other(kind, value):
    """A valid value of `kind` other than `value`."""
    choices = settings_read.options(kind)
    if choices:
        return next(c for c in choices if c != value)
    if kind is bool:
        return not value
    return value + 1 if kind is int else value + 0.5


# ------------------------------------------------------------------ one place per default

def test_base_config_is_the_tree():
    cfg = base_config()
    assert _flat(cfg.to_dict()) == _flat(settings_read.config_values(RunSettings()))
    assert sorted(_flat(cfg.to_dict())) == sorted(settings_read.field_names(RunSettings))
    assert RunSettings.from_config(cfg) == RunSettings()
    # Every leaf has a default, a one-line doc and a reading stage, in the tree itself.
    for name, _, _, stages, doc in settings.docs(RunSettings):
        assert doc and "\n" not in doc, name
        assert stages and set(stages) <= set(settings.STAGES), name


PPO_HYPER_FROM = {"exact_ratio": "old_logprobs"}  # PPOHyper's only field of another name
SAMPLING_FROM = {"max_new_tokens": "response_len", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "cache_dtype": "cache_dtype"}


def _structs():
    """(struct class, builder from a PPOSettings, {struct field: ppo field}) of every step struct
    built from the tree."""
    from llava_jax.generate.sampling import SamplingConfig
    from llava_jax.rl import fact_reward, ppo, setup as ppo_setup

    hyper_fields = [f.name for f in dataclasses.fields(ppo.PPOHyper)]
    weights_fields = [f.name for f in dataclasses.fields(fact_reward.RewardWeights)]
    return [(ppo.PPOHyper, ppo_setup.ppo_hyper, {n: PPO_HYPER_FROM.get(n, n) for n in hyper_fields}),
            (fact_reward.RewardWeights, fact_reward.RewardWeights.from_settings, {n: n for n in weights_fields}),
            (SamplingConfig, lambda p: ppo_setup.sampling_config(p, eos_id=2), SAMPLING_FROM)]


def test_step_structs_take_every_tree_field_and_hold_no_default_of_their_own():
    hints = dict((f.name, kind) for f, kind in settings_read.hints(PPOSettings))
    for struct, build, mapping in _structs():
        fields = {f.name: f for f in dataclasses.fields(struct)}
        defaults = build(PPOSettings())
        for name, source in mapping.items():
            assert source in hints, f"{struct.__name__}.{name}: no ppo.{source} in the settings tree"
            f = fields[name]
            if name != "exact_ratio":  # being replaced by a flag the loop passes (another change)
                assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                    f"{struct.__name__}.{name} has a default of its own; the settings tree holds it (ppo.{source})"
            # Built from the tree: its default, and any other value it is given.
            changed = PPOSettings().replace(**{source: _other(hints[source], getattr(PPOSettings(), source))})
            assert getattr(build(changed), name) != getattr(defaults, name), f"{struct.__name__}.{name}"
            if name != "exact_ratio":
                assert getattr(defaults, name) == getattr(PPOSettings(), source), f"{struct.__name__}.{name}"
    from llava_jax.rl import setup as ppo_setup

    assert ppo_setup.ppo_hyper(PPOSettings(old_logprobs="recompute")).exact_ratio
    assert not ppo_setup.ppo_hyper(PPOSettings(old_logprobs="sampler")).exact_ratio


def test_optim_config_is_the_settings_section():
    from llava_jax.train import optim

    assert optim.OptimConfig is settings.OptimSettings
    assert optim.SCHEDULES == typing.get_args(settings.Schedule)


def test_option_lists_are_the_code_s():
    from llava_jax.data import templates
    from llava_jax.models import layers, llama
    from llava_jax.rl import ppo

    assert set(typing.get_args(settings.KLEstimator)) == set(ppo.KL_ESTIMATORS)
    assert set(typing.get_args(settings.Dtype)) == set(layers.DTYPES)
    assert set(typing.get_args(settings.Remat)) == set(layers.REMAT_POLICIES)
    assert set(typing.get_args(settings.Attention)) == set(llama.ATTENTION_BACKENDS)
    assert set(typing.get_args(settings.Template)) == set(templates.BUILTIN_TEMPLATES)


def test_settings_is_the_lowest_layer():
    code = ("import sys, llava_jax.settings; "
            "print(sorted(m for m in sys.modules if m.startswith('llava_jax') or m == 'jax'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['llava_jax', 'llava_jax.settings', 'llava_jax.settings_read']"


# ---------------------------------------------------------------- options, converted once

def test_options_and_lists_are_converted_once_when_read():
    s = RunSettings.from_config({"requires": "a.py, b.py", "train": {"lora_targets": "q,v", "trainable": "lora"},
                                 "optim": {"learning_rate": 1}})
    assert s.requires == ("a.py", "b.py") and s.required_configs() == ["a.py", "b.py"]
    assert s.train.lora_targets == ("q", "v") and len(s.train.lora_config().targets) == 2
    assert isinstance(s.optim.learning_rate, float)
    assert s.train.uses_lora and s.train.trainable_parts == ()
    assert RunSettings().train.trainable_parts == ("projector", "llm") and not RunSettings().train.uses_lora
    assert RunSettings(train=settings.TrainSettings(trainable="lora+projector")).train.trainable_parts == ("projector",)
    assert RunSettings().ppo.recompute_old_logprobs and not PPOSettings(old_logprobs="sampler").recompute_old_logprobs
    assert RunSettings().replace(train={"lora_targets": ["q", "k"]}).train.lora_targets == ("q", "k")
    assert RunSettings().replace(requires="x.py").requires == ("x.py",)
    for where, value, message in [("ppo", {"kl_estimator": "k2"}, "config.ppo.kl_estimator='k2': expected one of"),
                                  ("optim", {"schedule": "step"}, "config.optim.schedule='step': expected one of"),
                                  ("model", {"cpu_shapes": "yes"}, "config.model.cpu_shapes='yes': expected one of"),
                                  ("train", {"trainable": "all"}, "config.train.trainable='all': expected one of"),
                                  ("data", {"template": "chatml"}, "config.data.template='chatml': expected one of"),
                                  ("log", {"tensorboard": 1}, "config.log.tensorboard=1: expected True or False"),
                                  ("train", {"max_steps": 1.5}, "config.train.max_steps=1.5: expected an integer")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            RunSettings.from_config({"stage": "ppo" if where == "ppo" else "sft", where: value})
    with pytest.raises(ValueError, match="config.stage='dpo': expected one of"):
        RunSettings.from_config({"stage": "dpo"})


def test_command_line_forms_of_lists():
    cfg = base_config()
    apply_overrides(cfg, ["--config.train.lora_targets=q,v", "--config.requires=a.py,b.py", "--config.seed=3"])
    s = RunSettings.from_config(cfg)
    assert (s.train.lora_targets, s.requires, s.seed) == (("q", "v"), ("a.py", "b.py"), 3)
    with pytest.raises(ValueError, match="--config.train.batch_sise: no such config field; closest: train.batch_size"):
        apply_overrides(cfg, ["--config.train.batch_sise=3"])


# ------------------------------------------------------- fields the stage does not read

@pytest.mark.parametrize("stage, field, value", [
    ("ppo", "data.num_buckets", 1), ("ppo", "train.batch_size", 8), ("ppo", "data.max_length", 2048),
    ("ppo", "log.peak_tflops", 100.0), ("ppo", "model.adapter", "x"), ("sft", "ppo.clip", 0.3),
    ("sft", "ppo.rollout_batch", 8), ("sft", "rm.eval_every", 5), ("sft", "eval.toy_dir", "data/toy"),
    ("sft", "data.captions", "c.json"), ("rm", "ppo.kl_coef", 0.2), ("rm", "eval.batch_size", 8),
])
def test_a_field_the_stage_does_not_read_is_refused_by_name(stage, field, value):
    section, name = field.split(".")
    cfg = {"stage": stage, section: {name: value}}
    with pytest.raises(ValueError) as e:
        RunSettings.from_config(cfg)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"config.{field}={value!r}: ")
    assert f"the {stage} stage does not read this field" in message
    # At its default it is no choice of the run's: accepted.
    default = getattr(getattr(RunSettings(), section), name)
    assert RunSettings.from_config({"stage": stage, section: {name: default}}).stage == stage
    # Settings built otherwise (replace) meet the same rule before any device work.
    with pytest.raises(ValueError, match=f"config.{field}="):
        validate(RunSettings(stage=stage).replace(**{section: {name: value}}), 1, 1)


def test_the_refusal_says_why_where_the_field_has_a_counterpart():
    with pytest.raises(ValueError, match="config.train.grad_accum=2: PPO splits its minibatches by ppo.grad_accum"):
        RunSettings.from_config({"stage": "ppo", "train": {"grad_accum": 2}})
    with pytest.raises(ValueError, match="config.train.grad_accum=2: the RM step takes whole batches"):
        RunSettings.from_config({"stage": "rm", "train": {"grad_accum": 2}})
    with pytest.raises(ValueError, match="config.data.eval_size=10: PPO holds no prompts out"):
        RunSettings.from_config({"stage": "ppo", "data": {"eval_size": 10}})


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_sets_only_what_its_stage_reads(path):
    s = RunSettings.from_config(load_config_file(path))
    assert s.stage in settings.STAGES


def test_the_command_line_refuses_an_unread_field_in_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs",
           "tiny_sft.py"), f"--config.workdir={tmp_path}", "--config.train.lora_targets=q,v", "--config.ppo.clip=0.3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: config.ppo.clip=0.3: the sft stage does not read this field"), lines[0]
