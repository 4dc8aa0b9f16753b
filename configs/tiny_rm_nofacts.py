"""python scripts/train.py --config configs/tiny_rm_nofacts.py

The facts ablation's reward model: tiny_rm exactly, but trained (and, in tiny_ppo_nofacts,
used) without the image's captions in its rating prompt; it must judge from the image alone."""
from configs.tiny_rm import get_config as tiny_rm


def get_config():
    c = tiny_rm()
    c.workdir = "runs/tiny_rm_nofacts"
    c.rm.with_facts = False
    return c
