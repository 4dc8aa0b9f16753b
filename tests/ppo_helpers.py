"""A tiny PPO world for tests: a briefly SFT-ed tiny LLaVA (the shared base) and a random
reward adapter + head over it (the "reward model")."""
import os

import jax

from configs.tiny_ppo import get_config as tiny_ppo
from llava_jax import heads, lora as lora_lib
from llava_jax.convert.ckpt import write_adapter_dir


def make_world(root: str, sft_steps: int = 30, seed: int = 0) -> tuple[str, str]:
    """(base checkpoint dir, reward adapter dir) under `root`: a short tiny_sft run (the
    policy must have learnt to stop for a length penalty to act on) and a random LoRA +
    reward head over it as the reward model."""
    from configs.tiny_sft import get_config as tiny_sft
    from llava_jax.convert import load_checkpoint
    from llava_jax.trainer import run

    sft = tiny_sft()
    sft.workdir = os.path.join(root, "sft")
    sft.train.max_steps = sft_steps
    sft.log.tensorboard = False
    sft.data.workers = 0
    sft.data.num_buckets = 1
    run(sft)
    base_dir = os.path.join(sft.workdir, "model")
    _, base = load_checkpoint(base_dir)
    lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapter = lora_lib.init_adapter(base, lcfg, jax.random.PRNGKey(seed + 1))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 2), 64))
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapter.params)
    head = heads.init_head("reward", base["llm"]["norm"]["scale"].shape[0], jax.random.PRNGKey(seed + 3))
    head["kernel"] = head["kernel"] * 20.0  # scores spread over a few units, like a trained RM's
    reward_dir = os.path.join(root, "reward_adapter")
    write_adapter_dir(reward_dir, lora_lib.Adapter(params, lcfg), head, "reward")
    return base_dir, reward_dir


def ppo_overrides(workdir: str, base_dir: str, reward_dir: str, steps: int, mesh=(1, -1, 1)) -> dict:
    """The test runs' settings over configs/tiny_ppo.py, as dotted keys (in-process or CLI)."""
    return {"requires": "", "workdir": str(workdir), "model.init": base_dir, "ppo.reward_adapter": reward_dir,
            "train.max_steps": steps, "train.lora_rank": 4,
            "optim.schedule": "constant",  # runs of different lengths share their first steps
            "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
            "ppo.rollout_batch": 8, "ppo.step_batch": 4, "ppo.response_len": 12,
            "checkpoint.every": 100, "log.tensorboard": False, "data.workers": 0}


def ppo_config(workdir: str, base_dir: str, reward_dir: str, steps: int, mesh=(1, -1, 1)):
    cfg = tiny_ppo()
    for key, value in ppo_overrides(workdir, base_dir, reward_dir, steps, mesh).items():
        node, name = cfg, key
        while "." in name:
            head, name = name.split(".", 1)
            node = node[head]
        node[name] = value
    return cfg
