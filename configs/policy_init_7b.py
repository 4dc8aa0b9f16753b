"""python scripts/train.py --config configs/policy_init_7b.py

The 7B PPO policy's starting adapter: LoRA SFT on the 7B SFT model, same shape and
schedule as policy_init_13b.py (r=64, alpha=16, lr 1e-4 cosine, 1 epoch, batch 128)."""
from configs.sft_7b import get_config as sft_7b


def get_config():
    c = sft_7b()
    c.workdir = "runs/policy_init_7b"
    c.model.init = "runs/sft_7b/model"
    c.train.trainable = "lora"
    c.train.lora_rank = 64
    c.train.lora_alpha = 16.0
    c.train.lora_dropout = 0.0
    c.train.num_epochs = 1.0
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "cosine"
    return c
