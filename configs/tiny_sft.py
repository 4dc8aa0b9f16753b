"""python scripts/train.py --config configs/tiny_sft.py

SFT of the embedded tiny LLaVA on the bundled toy "shapes" world: a few minutes on a CPU."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.workdir = "runs/tiny_sft"
    c.model.init = "tiny"
    c.train.trainable = "projector+llm"
    c.train.batch_size = 16
    c.train.num_epochs = 3.0
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.05
    c.data.train = "data/toy/sft.json"
    c.data.image_folder = "data/toy/images"
    c.data.tokenizer = "data/toy/tokenizer"
    c.data.max_length = 128
    c.checkpoint.every = 10
    return c
