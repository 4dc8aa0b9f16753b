"""Defaults shared by every config: each field with a one-line comment. Stage configs
(`sft_7b.py`, `rm_13b.py`, `tiny_sft.py`, ...) start from `base_config()` and set what
differs. Override any field from the command line: `--config.optim.learning_rate=1e-5`."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "sft"  # sft | rm | ppo (pretrain is sft with trainable=projector and template=plain)
    c.seed = 0  # model init, data order, dropout
    c.workdir = "runs/default"  # checkpoints/, metrics.jsonl and tb/ go here
    c.resume = True  # continue from the latest checkpoint in workdir
    c.requires = ""  # comma-separated config files run first when their workdir has no exported result

    c.model = ml_collections.ConfigDict()
    c.model.init = "tiny"  # "tiny" (random tiny LLaVA) or a converted checkpoint directory
    c.model.adapter = ""  # adapter inside model.init to start from ("" = none)
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # dtype of the frozen base on device
    c.model.remat = "none"  # none | full | dots | dots_no_batch
    c.model.attention = "xla"  # whole-sequence attention: xla | flash (Pallas splash on TPU, cuDNN on GPU;
    # Pallas interpret mode on CPU, for checking only) for training and scoring passes; the sampler stays on XLA
    c.model.cpu_shapes = "auto"  # auto | on | off: the forms XLA:CPU runs faster (folded query groups in
    # attention, unstacked decode layers); auto: on iff the run's devices (a compile check: its target's) are
    # CPUs. Decided once at the start of a run, which prints it

    c.train = ml_collections.ConfigDict()
    c.train.trainable = "projector+llm"  # projector | projector+llm | lora | lora+projector
    c.train.lora_rank = 64
    c.train.lora_alpha = 16.0
    c.train.lora_dropout = 0.0
    c.train.lora_targets = "q,k,v,o,gate,up,down"
    c.train.batch_size = 128  # global batch (all processes and accumulation steps)
    c.train.grad_accum = 1  # micro-batches per step (sft)
    c.train.num_epochs = 1.0
    c.train.max_steps = -1  # > 0: stop after this many steps (e.g. RM early stop at 200)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "cosine"  # cosine | constant | linear
    c.optim.warmup_ratio = 0.03
    c.optim.warmup_steps = 0  # > 0 wins over warmup_ratio
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # JSON/JSONL in the LLaVA(-RLHF) format of the stage
    c.data.image_folder = ""
    c.data.captions = ""  # image -> captions JSON (rm with facts, ppo)
    c.data.tokenizer = ""  # HF tokenizer directory
    c.data.template = "vicuna_v1"  # vicuna_v1 | plain
    c.data.max_length = 1280  # tokens, image placeholders included
    c.data.num_buckets = 3  # static sequence lengths (halving down from max_length)
    c.data.workers = 2  # image-decoding threads per process
    c.data.eval_size = 0  # records held out from data.train for evaluation
    c.data.strict = False  # bad records: raise instead of skip-and-count

    c.rm = ml_collections.ConfigDict()
    c.rm.centering = 1e-3  # weight of |mean(r_chosen + r_rejected)|
    c.rm.with_facts = True  # captions inside the "accurate" criterion (Fact-RLHF)
    c.rm.prompt_file = ""  # reward prompt wording ("" = llava_jax/prompts/fact_rlhf_reward.txt)
    c.rm.eval_every = 50  # steps between held-out evaluations

    c.ppo = ml_collections.ConfigDict()
    c.ppo.policy_adapter = ""  # policy-init adapter dir (a LoRA SFT run's workdir/adapter); "" = fresh LoRA = base
    c.ppo.reward_base = ""  # checkpoint dir of the reward/value base ("" = model.init, one shared base)
    c.ppo.reward_adapter = ""  # the RM run's adapter dir (LoRA + reward head); value starts from it
    c.ppo.rollout_batch = 512  # prompts sampled per PPO step (global)
    c.ppo.rollout_chunk = 0  # prompts sampled and scored per jitted pass (0 = the whole rollout batch)
    c.ppo.step_batch = 256  # rollouts per optimiser step (global)
    c.ppo.grad_accum = 1  # micro-batches per optimiser step
    c.ppo.ppo_epochs = 2  # passes over each rollout batch
    c.ppo.max_query_tokens = 128  # longer prompts are dropped (image counted as one token)
    c.ppo.response_len = 896  # max new tokens
    c.ppo.temperature = 1.0
    c.ppo.top_p = 1.0
    c.ppo.top_k = 0
    c.ppo.cache_dtype = "bfloat16"  # KV cache of the rollout sampler
    c.ppo.with_facts = True  # captions inside the reward prompt (Fact-RLHF)
    c.ppo.rm_weight = 1.0  # multiplier of the reward model's score (0: symbolic rewards only)
    c.ppo.correct_bonus = 2.0  # x correctness (multiple choice 1/0, yes/no-"No" +-0.5)
    c.ppo.length_bonus = -10.0  # x response length / response_len x item length_bonus
    c.ppo.no_stop_penalty = -8.0  # added when the response did not end with EOS
    c.ppo.kl_estimator = "k1"  # k1 (clamped at 0, as the original) | k1_unclamped | k3
    c.ppo.kl_coef = 0.1  # initial (or fixed) KL coefficient
    c.ppo.adaptive_kl = False  # proportional controller towards target_kl (Ziegler et al.)
    c.ppo.target_kl = 6.0  # per-sequence KL the adaptive controller aims at
    c.ppo.kl_horizon = 10000  # adaptive controller horizon (rollouts)
    c.ppo.reward_scale = 10.0  # shaped rewards x this (when not whitened)
    c.ppo.whiten_rewards = False  # whiten shaped rewards (no mean shift) instead of scaling
    c.ppo.gamma = 1.0
    c.ppo.lam = 1.0  # GAE lambda
    c.ppo.clip = 0.2  # policy ratio clip
    c.ppo.value_clip = 0.2
    c.ppo.vf_coef = 0.1
    # Fidelity to the original LLaVA-RLHF PPO (README "PPO: where we differ from the original").
    # The defaults reproduce it; the tiny configs choose the alternatives we think better.
    c.ppo.whiten_over_pads = True  # advantages: the score on the tensor's last position, GAE through the pads and
    # whitening statistics over every [batch, response_len] position, pads included (the original; a pad's advantage
    # is reward_scale x score - V(pad), and at the published shapes the pads outnumber the tokens, so the statistics
    # follow the pads). False: the episode ends at the last valid token, statistics over valid tokens only
    c.ppo.loss_over_pads = True  # policy and value losses as means over every position (the original: much of the
    # value gradient fits V(pad), and the pads dilute the policy gradient). False: means over valid tokens
    c.ppo.cut_at_question_mark = True  # cut each response after its first '?' token (LLaMA ids 1577 / 29973, as the
    # original): its EOS is gone, so the no-stop penalty applies. False: responses end at EOS only
    c.ppo.lr_schedule_unit = "rollout"  # the schedule steps once per PPO step (the original: warmup counts rollouts
    # and the whole first rollout trains at lr 0) | "update": once per optimiser update
    c.ppo.old_logprobs = "recompute"  # PPO's old log-probs from a teacher-forced policy pass (the original; the first
    # update's ratio is exactly 1 in any dtype) | "sampler": the sampler's (one pass fewer; equal in float32 only)
    c.ppo.reward_pad_multiple = 64  # reward-model inputs padded to a multiple of this (few compiles)
    c.ppo.export_merged = False  # also write the policy merged into the base as an HF model (workdir/hf_merged)

    c.eval = ml_collections.ConfigDict()
    c.eval.toy_dir = ""  # toy world (data/toy): PPO logs the rollouts' hallucination_rate and ends with a
    # greedy held-out evaluation of the SFT and PPO policies (llava_jax/eval/toy_eval.py); "" = off
    c.eval.batch_size = 64  # questions per generate call in that evaluation

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # steps
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every = 1
    c.log.tensorboard = True
    c.log.peak_tflops = 0.0  # per device, for MFU (0: look up the device kind)
    return c
