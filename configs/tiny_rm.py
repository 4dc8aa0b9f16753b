"""python scripts/train.py --config configs/tiny_rm.py

Fact-augmented LoRA reward model on the toy "shapes" preference pairs (the rejected answer
names a wrong colour or an absent shape), over the tiny SFT model (run first when
runs/tiny_sft has no model), so tiny_ppo's four roles share one base."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "rm"
    c.requires = "configs/tiny_sft.py"
    c.workdir = "runs/tiny_rm"
    c.model.init = "runs/tiny_sft/model"
    c.train.trainable = "lora"
    c.train.lora_rank = 8
    c.train.lora_alpha = 16.0
    c.train.batch_size = 16
    c.train.num_epochs = 8.0
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 5
    c.data.train = "data/toy/preference.json"
    c.data.image_folder = "data/toy/images"
    c.data.captions = "data/toy/captions.json"
    c.data.tokenizer = "data/toy/tokenizer"
    c.data.max_length = 448  # the rating prompt with five captions takes ~410 tokens
    c.data.eval_size = 16
    c.rm.eval_every = 10
    c.checkpoint.every = 20
    return c
