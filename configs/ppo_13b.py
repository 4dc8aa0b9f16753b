"""python scripts/train.py --config configs/ppo_13b.py

Factually augmented PPO (LLaVA-RLHF 13B-336): the four roles over ONE 13B base - policy
(trains, from the policy-init LoRA), ref_policy (that adapter, frozen), value (from the RM
adapter, new zero value head, trains) and reward (RM adapter + head, frozen). AdamW lr 3e-5
cosine with 5 warmup steps, no weight decay, clip 1.0; k1 KL clamped at 0 with a fixed
coefficient 0.1; policy/value clip 0.2, vf_coef 0.1; GAE gamma = lambda = 1; shaped rewards
x10; advantages whitened over the global batch; rollout batch 512, step batch 256, 2 PPO
epochs per rollout, 4 epochs over the prompts; temperature 1; queries <= 128 tokens,
responses <= 896; checkpoints every 10 steps. The original's behaviour, quirks included
(configs/common.py's defaults, README "PPO: where we differ from the original"): pads
in the advantage whitening and in both losses, responses cut at '?', the lr schedule stepped
once per PPO step, old log-probs from a teacher-forced pass."""
from configs.common import base_config


def get_config():
    c = base_config()
    c.stage = "ppo"
    c.workdir = "runs/ppo_13b"
    c.model.init = "runs/sft_13b/model"  # LLaVA-RLHF-13b-v1.5-336 SFT model (converted)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.train.trainable = "lora"
    c.train.lora_rank = 64
    c.train.lora_alpha = 16.0
    c.train.lora_dropout = 0.0
    c.train.num_epochs = 4.0  # passes over the prompts
    c.optim.learning_rate = 3e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.data.train = "data/LLaVA-RLHF-Data/llava_ppo50k-aokvqa12k-vqa10k.json"
    c.data.image_folder = "data/coco/train2017"
    c.data.captions = "data/LLaVA-RLHF-Data/image_to_caption.json"
    c.data.tokenizer = "ckpts/vicuna-13b-v1.5"
    c.ppo.policy_adapter = "runs/policy_init_13b/adapter"
    c.ppo.reward_base = ""  # the same 13B base
    c.ppo.reward_adapter = "runs/rm_13b/adapter"
    c.ppo.rollout_batch = 512
    c.ppo.step_batch = 256
    c.ppo.ppo_epochs = 2
    c.ppo.grad_accum = 32  # micro-batches of 8 rollouts per optimiser step
    c.ppo.rollout_chunk = 64  # prompts per sampling pass: the 13B KV cache of 512 fits nothing (compile_check.py)
    c.ppo.max_query_tokens = 128
    c.ppo.response_len = 896
    c.ppo.temperature = 1.0
    c.ppo.kl_estimator = "k1"
    c.ppo.kl_coef = 0.1
    c.ppo.reward_scale = 10.0
    c.checkpoint.every = 10
    return c
