"""python scripts/train.py --config configs/tiny_sft.py

SFT of the embedded tiny LLaVA on the bundled toy "shapes" world: ~1.7 minutes on a CPU.
30 epochs over 804 conversations on 400 images (1500 steps): descriptions, questions about
one shape, and short multiple-choice / yes-no answers in the RL prompts' forms. The model
learns to see (it names ~93% of the shapes in held-out images) and learns the data's flaw:
its greedy answers to detailed-description prompts add a shape that is not there. It is the
base that tiny_rm and tiny_ppo start from."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.workdir = "runs/tiny_sft"
    c.model.init = "tiny"
    c.train.trainable = "projector+llm"
    c.train.batch_size = 16
    c.train.num_epochs = 30.0
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.05
    c.data.train = "data/toy/sft.json"
    c.data.image_folder = "data/toy/images"
    c.data.tokenizer = "data/toy/tokenizer"
    c.data.max_length = 96  # the longest toy conversation (3 turns) takes 92 tokens
    c.checkpoint.every = 100
    return c
