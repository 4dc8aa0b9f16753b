"""python scripts/train.py --config configs/sft_13b.py

SFT of the 13B model (CLIP ViT-L/14-336, 576 image tokens + Vicuna-13B-v1.5), same recipe
as sft_7b: lr 2e-5, cosine, 3% warmup, 3 epochs, global batch 128, max length 1280."""
from configs.sft_7b import get_config as sft_7b


def get_config():
    c = sft_7b()
    c.workdir = "runs/sft_13b"
    c.model.init = "runs/pretrain_13b/model"  # pretrain_7b.py with the 13B/336 init
    c.data.tokenizer = "ckpts/vicuna-13b-v1.5"
    return c
