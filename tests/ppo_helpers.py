"""A tiny PPO world for tests: a briefly SFT-ed tiny LLaVA (the shared base) and a briefly
trained toy reward model over it (LoRA + reward head)."""
import json
import os
import re
import subprocess
import sys

from configs.tiny_ppo import get_config as tiny_ppo

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_config(cfg) -> dict:
    """Runs the stage of a ConfigDict in this process, as scripts/train.py would after its
    requirements: read into settings, then the stage's loop."""
    from llava_jax.rl.loop import run_ppo
    from llava_jax.settings import RunSettings
    from llava_jax.train.loop import run_train

    settings = RunSettings.from_config(cfg)
    return run_ppo(settings) if settings.stage == "ppo" else run_train(settings)


def make_world(root: str, sft_steps: int | None = None, rm_steps: int | None = None,
               sft_epochs: float | None = None) -> tuple[str, str]:
    """(base checkpoint dir, reward adapter dir) under `root`: the README's chain, tiny_sft
    then tiny_rm over it, as configured unless `*_steps` cut the runs short or `sft_epochs`
    shortens the SFT (a schedule of its own). Test-speed settings that leave the training
    itself alone: one device, no TensorBoard, checkpoints and RM evaluations only at the end."""
    from configs.tiny_rm import get_config as tiny_rm
    from configs.tiny_sft import get_config as tiny_sft

    for name, make, steps, epochs in (("sft", tiny_sft, sft_steps, sft_epochs), ("rm", tiny_rm, rm_steps, None)):
        cfg = make()
        cfg.requires, cfg.workdir = "", os.path.join(root, name)
        if steps is not None:
            cfg.train.max_steps = steps
        if epochs is not None:
            cfg.train.num_epochs = epochs
        cfg.log.tensorboard, cfg.data.workers = False, 0
        cfg.checkpoint.every = 10**9  # the last step still saves (and the RM evaluates)
        if steps is not None or name == "rm":  # short runs, or (the RM) inputs of nearly one length: one compile
            cfg.data.num_buckets = 1
        # One device: partitioning over the 8 forced CPU devices would only add compile time
        # and collectives on 2 cores (mesh invariance has tests of its own).
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
        if name == "rm":
            cfg.rm.eval_every = 10**9
            cfg.model.init = os.path.join(root, "sft", "model")
            if steps is not None:  # a short run: full lr from the first step, or its scores stay ~0
                cfg.optim.schedule, cfg.optim.learning_rate, cfg.optim.warmup_steps = "constant", 2e-3, 5
                # ... and no held-out evaluation (its own compile and 100 pairs' forward): no test
                # reads a short run's RM accuracy (the held-out check is tiny_rm's, on toy_world).
                cfg.data.eval_size = 0
        run_config(cfg)
    return os.path.join(root, "sft", "model"), os.path.join(root, "rm", "adapter")


def make_world_on_one_device(root: str, **kwargs) -> tuple[str, str]:
    """`make_world` in a child process that has one CPU device. The pytest process forces 8
    (for the sharding tests), and on this 2-core CPU that slows a single-device run's steps by
    ~15% (300 tiny_sft steps: 13.0-14.0 s against 11.3-11.9 s). It matters for the long runs:
    toy_world's 1000 SFT and 215 RM steps."""
    code = (f"import json, sys; sys.path[:0] = [{ROOT!r}, {TESTS!r}]; from ppo_helpers import make_world; "
            f"print(json.dumps(make_world({root!r}, **{kwargs!r})))")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip()}  # other flags kept
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"make_world({root!r}, {kwargs}) failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    sft_model, rm_adapter = json.loads(done.stdout.splitlines()[-1])
    return sft_model, rm_adapter


def ppo_overrides(workdir: str, base_dir: str, reward_dir: str, steps: int, mesh=(1, 1, 1)) -> dict:
    """The test runs' settings over configs/tiny_ppo.py, as dotted keys (in-process or CLI).
    One device unless `mesh` says otherwise: the mesh test splits every axis."""
    return {"requires": "", "workdir": str(workdir), "model.init": base_dir, "ppo.reward_adapter": reward_dir,
            "train.max_steps": steps, "train.lora_rank": 4,
            "optim.schedule": "constant",  # runs of different lengths share their first steps
            "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
            "ppo.rollout_batch": 8, "ppo.step_batch": 4, "ppo.response_len": 12,
            "checkpoint.every": 100, "log.tensorboard": False, "data.workers": 0,
            "eval.toy_dir": ""}  # the held-out evaluation has a test of its own (test_toy_rlhf.py)


def ppo_config(workdir: str, base_dir: str, reward_dir: str, steps: int, mesh=(1, 1, 1)):
    cfg = tiny_ppo()
    cfg.update_from_flattened_dict(ppo_overrides(workdir, base_dir, reward_dir, steps, mesh))
    return cfg
