"""python scripts/train.py --config configs/rm_13b.py

Fact-augmented reward model (LLaVA-RLHF): from the 13B SFT model, LoRA r=64, alpha=16,
dropout 0 on q,k,v,o,gate,up,down; scalar head at the last token; pairwise loss + 1e-3 x
|mean(r_chosen + r_rejected)|; lr 2e-5 constant with warmup, 1 epoch, 32 pairs per step,
500 pairs held out. The published run early-stopped at step 200 (max_steps below);
expected held-out accuracy 65-70%. One 13B RM serves both the 7B and 13B policies."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "rm"
    c.workdir = "runs/rm_13b"
    c.model.init = "runs/sft_13b/model"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.train.trainable = "lora"
    c.train.lora_rank = 64
    c.train.lora_alpha = 16.0
    c.train.lora_dropout = 0.0
    c.train.batch_size = 32
    c.train.num_epochs = 1.0
    c.train.max_steps = 200  # early stop, as the published run
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.03
    c.data.train = "data/LLaVA-Human-Preference-10K/llava_7b_v1_preference.json"
    c.data.image_folder = "data/coco/train2017"
    c.data.captions = "data/LLaVA-RLHF-Data/image_to_caption.json"
    c.data.tokenizer = "ckpts/vicuna-13b-v1.5"
    c.data.max_length = 1280
    c.data.eval_size = 500
    c.rm.with_facts = True
    c.rm.eval_every = 50
    c.checkpoint.every = 50
    return c
