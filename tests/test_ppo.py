"""The PPO driver end to end on the tiny world: mesh invariance, a length penalty that
shortens responses, SIGKILL during a run + resume, exported adapters."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ppo_helpers import make_world, ppo_config, ppo_overrides, run_config

# Whole pipelines (their fixtures train a toy world): the full suite only (docs/testing.md).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR: list = []  # where reference_run ran (its checkpoints and exports)
TIMING = ("rollout_seconds", "score_seconds", "update_seconds", "step_seconds", "tokens_per_s")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """30 SFT + 30 RM steps (no held-out RM evaluation: no test here reads it): a policy that
    still varies its answers (and their lengths) under sampling, and a reward model whose
    scores vary (the full tiny_sft is too sure of itself for a few PPO steps to move)."""
    os.chdir(ROOT)
    return make_world(str(tmp_path_factory.mktemp("ppo_world")), sft_steps=30, rm_steps=30)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    """5 PPO steps on one device, checkpointing every step (the baseline of two tests)."""
    workdir = tmp_path_factory.mktemp("ppo_reference")
    REFERENCE_DIR[:] = [workdir]
    cfg = ppo_config(workdir, *world, steps=5, mesh=(1, 1, 1))
    cfg.checkpoint.every = 1
    run_config(cfg)
    return _metrics(workdir)


def test_same_ppo_steps_on_one_device_and_on_8_devices(world, reference_run, tmp_path):
    workdir = tmp_path / "mesh"
    run_config(ppo_config(workdir, *world, steps=2, mesh=(2, 2, 2)))  # every mesh axis split
    rows = _metrics(workdir)
    assert len(rows) == 2 and reference_run[1]["approx_kl"] > 0  # step 2 samples from an updated policy
    for row, ref in zip(rows, reference_run):
        assert row.keys() == ref.keys()
        for key in ref:
            np.testing.assert_allclose(row[key], ref[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_length_penalty_alone_shortens_responses(world, tmp_path):
    cfg = ppo_config(tmp_path / "length", *world, steps=12)
    cfg.ppo.rollout_batch, cfg.ppo.step_batch = 16, 8
    cfg.ppo.rm_weight = cfg.ppo.correct_bonus = cfg.ppo.no_stop_penalty = 0.0
    cfg.ppo.length_bonus = -10.0  # the original's weight (tiny_ppo scales it to its 32-token responses)
    cfg.optim.learning_rate = 3e-3  # 12 steps: a trend well above the noise of each batch's prompt mix
    cfg.ppo.export_merged = True
    run_config(cfg)
    rows = _metrics(cfg.workdir)
    lengths = [r["response_length"] for r in rows]
    assert all(r["rm_score"] == 0 and r["no_stop_penalty"] == 0 for r in rows)
    assert np.mean(lengths[-4:]) < np.mean(lengths[:2]) - 1.5, lengths
    assert max(r["kl"] for r in rows) < 10.0  # the KL penalty keeps the policy near the reference
    for name in ("adapter", "peft_adapter", "value_adapter", "metrics.png", "hf_merged/config.json"):
        assert os.path.exists(os.path.join(cfg.workdir, name)), name
    with open(os.path.join(cfg.workdir, "peft_adapter", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
    samples = [json.loads(line) for line in open(os.path.join(cfg.workdir, "rollouts", "step_000012.jsonl"))]
    assert len(samples) == 16 and "reward_input" in samples[0]


def _cmd(workdir, world, steps):
    settings = {**ppo_overrides(workdir, *world, steps=steps, mesh=(1, 1, 1)), "checkpoint.every": 1}
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
            os.path.join(ROOT, "configs", "tiny_ppo.py")] + [f"--config.{k}={v}" for k, v in settings.items()]


def test_sigkill_during_ppo_then_resume_reaches_the_same_metrics(world, reference_run, tmp_path):
    steps = len(reference_run)
    env = {**os.environ, "PYTHONPATH": ROOT}  # conftest's matmul precision included

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_cmd(killed, world, steps), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break  # step 2 is logged: the process is now rolling out step 3
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    tail = (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, tail
    assert 2 <= len(_metrics(killed)) < steps, tail
    resumed = subprocess.run(_cmd(killed, world, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(killed) == reference_run  # bit-identical on CPU


def test_value_and_reward_on_a_second_base_with_its_own_tower(world, tmp_path):
    """The 7B recipe's layout: policy/ref over one base, value/reward over another whose
    vision tower sees 84 px images (36 patches where the policy reads 16)."""
    import dataclasses

    import jax

    from llava_jax.models import heads, lora as lora_lib
    from llava_jax.models.weights import save_checkpoint, write_adapter_dir
    from llava_jax.models.llava import init_params, tiny_config

    small = tiny_config()
    config = dataclasses.replace(small, vision=dataclasses.replace(small.vision, image_size=84),
                                 text=dataclasses.replace(small.text, hidden_size=96, num_layers=3))
    assert config.num_image_tokens == 36
    base = jax.device_get(init_params(config, jax.random.PRNGKey(5)))
    save_checkpoint(str(tmp_path / "reward_base"), config, base)
    adapter = lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=4, alpha=8.0), jax.random.PRNGKey(6))
    write_adapter_dir(str(tmp_path / "reward_adapter"), adapter,
                      heads.init_head("reward", config.text.hidden_size, jax.random.PRNGKey(7)), "reward")
    cfg = ppo_config(tmp_path / "two_bases", world[0], str(tmp_path / "reward_adapter"), steps=2)
    cfg.ppo.reward_base = str(tmp_path / "reward_base")
    run_config(cfg)
    rows = _metrics(cfg.workdir)
    assert len(rows) == 2 and all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert rows[0]["rm_score"] != 0 and rows[1]["value_mean"] != 0  # the value head trained on the second base


ORIGINAL_RECIPE = {"ppo.whiten_over_pads": True, "ppo.loss_over_pads": True, "ppo.cut_at_question_mark": True,
                   "ppo.lr_schedule_unit": "rollout", "ppo.old_logprobs": "recompute"}


@pytest.mark.parametrize("old_logprobs", ["recompute", "sampler"])
def test_original_recipe_in_bfloat16(world, tmp_path, old_logprobs):
    """ppo_7b/13b's settings (the original's) in bfloat16: the whole first rollout trains at
    lr 0, so every one of its updates sees the rollout's own policy. With the old log-probs
    recomputed by a teacher-forced pass the ratio is then exactly 1 (approx_kl 0, nothing
    clipped); the sampler's bfloat16 log-probs are off from that pass (the KL starts biased)."""
    cfg = ppo_config(tmp_path / old_logprobs, *world, steps=1)
    cfg.update_from_flattened_dict({**ORIGINAL_RECIPE, "ppo.old_logprobs": old_logprobs})
    cfg.model.dtype = cfg.model.param_dtype = "bfloat16"
    run_config(cfg)
    (first,) = _metrics(cfg.workdir)
    assert first["lr"] == 0.0  # the schedule itself: test_fidelity.py
    if old_logprobs == "recompute":
        assert first["approx_kl"] == 0.0 and first["policy_clipfrac"] == 0.0
    else:
        assert first["approx_kl"] > 1e-6


def test_rerun_of_a_finished_run_exports_without_training(world, reference_run, tmp_path):
    """A run that checkpointed its last step but never exported (killed in between, or a
    multi-host run, which exports from one process): the rerun restores the final state, trains
    nothing, writes no metrics line twice and exports."""
    import shutil

    workdir = tmp_path / "rerun"
    shutil.copytree(REFERENCE_DIR[0], workdir)
    for name in ("adapter", "peft_adapter", "value_adapter"):
        shutil.rmtree(workdir / name)
    lines = (workdir / "metrics.jsonl").read_text()
    cfg = ppo_config(workdir, *world, steps=5)
    cfg.checkpoint.every = 1
    run_config(cfg)
    assert (workdir / "metrics.jsonl").read_text() == lines
    for name in ("adapter", "peft_adapter", "value_adapter"):
        assert (workdir / name).is_dir(), name


def test_settings_ppo_cannot_honour_are_rejected(world, tmp_path):
    cfg = ppo_config(tmp_path / "dropout", *world, steps=1)
    cfg.train.lora_dropout = 0.1
    with pytest.raises(ValueError, match=r"config.train.lora_dropout=0.1: PPO runs its adapters without dropout"):
        run_config(cfg)
    cfg.train.lora_dropout, cfg.train.grad_accum = 0.0, 2
    with pytest.raises(ValueError, match=r"config.train.grad_accum=2: PPO splits its minibatches by ppo.grad_accum"):
        run_config(cfg)
    cfg.train.grad_accum, cfg.data.eval_size = 1, 10
    with pytest.raises(ValueError, match=r"config.data.eval_size=10: PPO holds no prompts out"):
        run_config(cfg)
