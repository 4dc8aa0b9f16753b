"""python scripts/train.py --config configs/ppo_7b.py

Factually augmented PPO (LLaVA-RLHF 7B): policy and ref_policy over the 7B-224 SFT base,
value and reward over the 13B-336 SFT base (two bases, two vision towers: each tower runs
once per rollout batch). Hyper-parameters as ppo_13b.py (the two published scripts share
them)."""
from configs.ppo_13b import get_config as ppo_13b


def get_config():
    c = ppo_13b()
    c.workdir = "runs/ppo_7b"
    c.model.init = "runs/sft_7b/model"  # LLaVA-RLHF-7b-v1.5-224 SFT model (converted)
    c.data.tokenizer = "ckpts/vicuna-7b-v1.5"
    c.ppo.policy_adapter = "runs/policy_init_7b/adapter"
    c.ppo.reward_base = "runs/sft_13b/model"  # the 13B-336 base of the reward model
    c.ppo.reward_adapter = "runs/rm_13b/adapter"
    return c
