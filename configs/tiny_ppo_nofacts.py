"""python scripts/train.py --config configs/tiny_ppo_nofacts.py

The paper's central comparison on the toy world: tiny_ppo exactly, but against a reward
model trained and used without captions (tiny_rm_nofacts), over the same tiny SFT model. Its
held-out table sits beside tiny_ppo's in the README ("What the toy world shows")."""
from configs.tiny_ppo import get_config as tiny_ppo


def get_config():
    c = tiny_ppo()
    c.requires = "configs/tiny_sft.py,configs/tiny_rm_nofacts.py"
    c.workdir = "runs/tiny_ppo_nofacts"
    c.ppo.reward_adapter = "runs/tiny_rm_nofacts/adapter"
    c.ppo.with_facts = False
    return c
