"""python scripts/train.py --config configs/tiny_rm.py

Fact-augmented LoRA reward model on the toy "shapes" preference pairs (each on an image of
its own): the faithful, complete description against one that names a shape the image
lacks (the SFT data's flaw among them), leaves a shape out, or evades. Over the tiny SFT
model (run first when runs/tiny_sft has no model), so tiny_ppo's four roles share one base.
100 pairs are held out; ~0.95 held-out accuracy after 215 steps, ~1.5 minutes on a CPU."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "rm"
    c.requires = "configs/tiny_sft.py"
    c.workdir = "runs/tiny_rm"
    c.model.init = "runs/tiny_sft/model"
    c.train.trainable = "lora"
    c.train.lora_rank = 32
    c.train.lora_alpha = 64.0
    c.train.batch_size = 16
    c.train.num_epochs = 5.0  # 700 training pairs: 215 steps
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 10
    c.data.train = "data/toy/preference.json"
    c.data.image_folder = "data/toy/images"
    c.data.captions = "data/toy/captions.json"
    c.data.tokenizer = "data/toy/tokenizer"
    c.data.max_length = 304  # the rating prompt with five captions: at most 302 tokens
    c.data.eval_size = 100
    c.rm.eval_every = 25
    c.checkpoint.every = 25
    return c
