"""python scripts/train.py --config configs/sft_7b.py

Stage 2 (SFT): full fine-tune of projector + LLM (vision tower frozen), vicuna_v1 template.
LLaVA-RLHF: lr 2e-5, cosine, 3% warmup, 3 epochs, global batch 128, max length 1280,
images padded to square. Starts from stage 1's runs/pretrain_7b/model."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.workdir = "runs/sft_7b"
    c.model.init = "runs/pretrain_7b/model"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.train.trainable = "projector+llm"
    c.train.batch_size = 128
    c.train.num_epochs = 3.0
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.data.train = "data/LLaVA-RLHF/sft.json"
    c.data.image_folder = "data/coco/train2017"
    c.data.tokenizer = "ckpts/vicuna-7b-v1.5"
    c.data.template = "vicuna_v1"
    c.data.max_length = 1280
    c.checkpoint.every = 500
    return c
