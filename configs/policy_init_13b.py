"""python scripts/train.py --config configs/policy_init_13b.py

The PPO policy's starting adapter: LoRA SFT on the 13B SFT model (same LoRA shape as the
reward model: r=64, alpha=16, dropout 0, q,k,v,o,gate,up,down), lr 1e-4, cosine, 1 epoch,
global batch 128."""
from configs.sft_13b import get_config as sft_13b


def get_config():
    c = sft_13b()
    c.workdir = "runs/policy_init_13b"
    c.model.init = "runs/sft_13b/model"
    c.train.trainable = "lora"
    c.train.lora_rank = 64
    c.train.lora_alpha = 16.0
    c.train.lora_dropout = 0.0
    c.train.num_epochs = 1.0
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "cosine"
    return c
