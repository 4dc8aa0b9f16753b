"""python scripts/train.py --config configs/pretrain_7b.py

Stage 1 (feature alignment): only the projector trains, `plain` template. LLaVA-RLHF 7B:
CLIP ViT-L/14 at 224 px + Vicuna-7B-v1.5, lr 2e-3, 1 epoch, global batch 128.
Start: python tools/convert_hf.py import --hf vicuna-7b-v1.5 --vision-tower clip-vit-large-patch14 --out ckpts/init_7b"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.workdir = "runs/pretrain_7b"
    c.model.init = "ckpts/init_7b"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.train.trainable = "projector"
    c.train.batch_size = 128
    c.train.num_epochs = 1.0
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.data.train = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    c.data.image_folder = "data/LLaVA-Pretrain/images"
    c.data.tokenizer = "ckpts/vicuna-7b-v1.5"
    c.data.template = "plain"
    c.data.max_length = 2048
    c.checkpoint.every = 500
    return c
