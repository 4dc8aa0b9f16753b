"""The random PPO world of `scripts/bench_ppo.py --vs-hf` and `scripts/bench_gpu.py`, and our
PPO step driven from the library pieces (not a script to run).

A random LLaVA base with four LoRA roles and two heads (`make_roles`; `export_world` writes
them as a llava-hf directory and PEFT adapters for the PyTorch side), synthetic left-padded
prompts with images, the reward model's inputs (query + response + a fixed rating prompt,
left padded), and `OursPPO`: rollout.generate_responses, score_responses, recompute_old,
finish_rollout and ppo.ppo_step, each jitted once, as the PPO loop runs them, with the
PPO semantics of configs/common.py.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from llava_jax.models.lora import Adapter, LoraConfig
    from llava_jax.models.llava import LlavaConfig
    from llava_jax.rl.batches import Rollout

MODELS = {  # name: (layers, hidden, intermediate, heads, image size)
    "tiny": None,  # tiny_config()
    "small": (8, 512, 1408, 8, 112),
    "7b": (32, 4096, 11008, 32, 224),
}
PAD, BOS, EOS = 0, 1, 2
PHASES = ("sampling", "scoring", "update")


def build_config(name: str, layers: int | None, vocab: int = 512) -> LlavaConfig:
    """Vocab 512 with <image> = 511 fits the bundled toy tokenizer (the driver mode)."""
    from llava_jax.models import clip, llama, llava

    if MODELS[name] is None:
        config = llava.tiny_config()
        return config if layers is None else dataclasses.replace(
            config, text=dataclasses.replace(config.text, num_layers=layers))
    n, hidden, inter, heads, image = MODELS[name]
    vision = (clip.ClipVisionConfig(image_size=image, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                    num_layers=24, num_heads=16) if name == "7b" else
              clip.ClipVisionConfig(image_size=image, patch_size=14, hidden_size=256, intermediate_size=1024,
                                    num_layers=4, num_heads=4))
    text = llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers or n,
                             num_heads=heads, num_kv_heads=heads, max_position_embeddings=4096)
    return llava.LlavaConfig(vision=vision, text=text, projector_type="linear", image_token_index=vocab - 1)


def describe(config: LlavaConfig) -> str:
    t = config.text
    llm = t.num_layers * (4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size)
    return (f"{t.num_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, ~{llm / 1e6:.0f}M LLM params, "
            f"{config.num_image_tokens} image tokens")


def random_adapter(base: dict, lora: LoraConfig, rng: jax.Array, scale: float = 0.05) -> Adapter:
    """A LoRA adapter with random `b` too (a trained adapter: it moves the model off the base)."""
    from llava_jax.models import lora as lora_lib

    adapter = lora_lib.init_adapter(base, lora, rng)
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapter.params)
    keys = jax.random.split(jax.random.fold_in(rng, 7), len(leaves))
    params = [scale * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "b" else x
              for (path, x), k in zip(leaves, keys)]
    return lora_lib.Adapter(jax.tree_util.tree_unflatten(tree, params), lora)


def make_roles(config: LlavaConfig, rank: int, alpha: float = 16.0, seed: int = 0,
               base: dict | None = None) -> tuple[dict, dict, dict]:
    """(base, adapters by role, heads by kind), host arrays (`base` when given is kept as is).
    The policy has moved off its reference (two random adapters); the value adapter starts
    as the reward adapter (the original's init); the value head is random rather than the
    original's zeros, so the first update already sends gradients through the value adapter."""
    from llava_jax.models import heads, lora as lora_lib
    from llava_jax.models.llava import init_params

    key = jax.random.PRNGKey(seed)
    to_host = functools.partial(jax.tree_util.tree_map, np.asarray)
    base = to_host(jax.device_get(init_params(config, key))) if base is None else base
    lora = lora_lib.LoraConfig(rank=rank, alpha=alpha)
    adapters = {name: random_adapter(base, lora, jax.random.fold_in(key, i + 1))
                for i, name in enumerate(("policy", "ref_policy", "reward"))}
    adapters["value"] = adapters["reward"]
    head_of = {kind: heads.init_head("reward", config.text.hidden_size, jax.random.fold_in(key, 10 + i))
               for i, kind in enumerate(("reward", "value"))}
    return base, {k: lora_lib.Adapter(to_host(v.params), v.config) for k, v in adapters.items()}, to_host(head_of)


def export_world(root: str, config: LlavaConfig, base: dict, adapters: dict,
                 head_of: dict) -> tuple[str, dict]:
    """The world as HF files: a llava-hf directory and one PEFT directory per role (heads beside)."""
    from llava_jax.convert import export_hf
    from llava_jax.convert.peft import write_peft_adapter

    hf_dir = os.path.join(root, "hf")
    export_hf(config, base, hf_dir)
    dirs = {}
    for name, adapter in adapters.items():
        dirs[name] = os.path.join(root, name)
        kind = name if name in head_of else None
        write_peft_adapter(dirs[name], adapter, head_of.get(kind), kind)
    return hf_dir, dirs


def make_prompts(config: LlavaConfig, batch: int, text_len: int, seed: int = 0) -> dict:
    """Left-padded queries (BOS, the image placeholders, text; row b has b % 4 pads) and images."""
    rng = np.random.RandomState(seed)
    n_img, size, vocab = config.num_image_tokens, config.vision.image_size, config.text.vocab_size
    width = 1 + n_img + text_len
    ids = np.full((batch, width), PAD, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for b in range(batch):
        pad = b % 4
        text = rng.randint(3, vocab - 1, size=text_len - pad)  # never the placeholder (vocab - 1)
        ids[b, pad:] = np.concatenate([[BOS], np.full(n_img, config.image_token_index), text])
        mask[b, pad:] = 1
    return {"query_ids": ids, "query_mask": mask,
            "pixel_values": rng.randn(batch, size, size, config.vision.num_channels).astype(np.float32),
            "length_bonus": np.ones(batch, np.float32), "valid": np.ones(batch, np.int32)}


def reward_inputs(rollout: dict, rating_ids: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """The RM's input per row: query + response (valid tokens) + the rating prompt, left
    padded to a multiple of `multiple` (the original reads the score at the last position)."""
    rows = [np.concatenate([q[qm.astype(bool)], r[rm.astype(bool)], rating_ids])
            for q, qm, r, rm in zip(rollout["query_ids"], rollout["query_mask"], rollout["response"],
                                    rollout["response_mask"])]
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
    return ids, mask


def cut_ids(text: str, config: LlavaConfig) -> tuple[int, ...]:
    """The ids standing for LLaMA's two '?' tokens (1577, 29973) the original cuts responses at:
    `text` (comma-separated) or, when empty, the two ids below the placeholder."""
    vocab = config.text.vocab_size
    return tuple(int(t) for t in text.split(",") if t.strip()) if text else (vocab - 3, vocab - 2)


def minibatch_orders(seed: int, round_: int, epochs: int, rows: int) -> list[np.ndarray]:
    return [np.random.default_rng((seed, round_, e)).permutation(rows) for e in range(epochs)]


def ppo_settings(lr: float) -> tuple[Any, Any, float, Any, Any]:
    """(PPOHyper, RewardWeights, kl_coef, OptimConfig, settings) of the settings tree's defaults; lr constant."""
    from llava_jax.rl import fact_reward, setup as ppo_setup
    from llava_jax.settings import RunSettings

    c = RunSettings()
    p = c.ppo
    optim = c.optim.replace(learning_rate=lr, schedule="constant", warmup_steps=0, warmup_ratio=0.0)
    return ppo_setup.ppo_hyper(p), fact_reward.RewardWeights.from_settings(p), float(p.kl_coef), optim, c


class OursPPO:
    """Our PPO step from the library pieces, one jitted pass per piece as the driver runs them."""

    def __init__(self, config: LlavaConfig, base: dict, adapters: dict, head_of: dict, *, response_len: int,
                 dtype: str, lr: float = 3e-5, rating_ids: np.ndarray, cut_ids: tuple[int, ...] = (),
                 seed: int = 0, cpu_shapes: bool = False) -> None:
        from llava_jax.rl import ppo, roles, rollout
        from llava_jax.models import trainable
        from llava_jax.generate.sampling import SamplingConfig
        from llava_jax.train.optim import make_optimizer
        from llava_jax.train.state import create_state

        self.hyper, weights, self.kl_coef, optim, self.cfg = ppo_settings(lr)
        config = config.with_runtime(dtype=dtype, param_dtype=dtype, cpu_shapes=cpu_shapes)
        lora = adapters["policy"].config
        self.spec = spec = roles.PPOSpec(config, lora, config, lora, lora, shared_base=True,
                                         temperature=self.cfg.ppo.temperature)
        sampling = SamplingConfig(max_new_tokens=response_len, temperature=self.cfg.ppo.temperature,
                                  top_p=self.cfg.ppo.top_p, top_k=self.cfg.ppo.top_k, eos_id=EOS, pad_id=PAD,
                                  cache_dtype=dtype)
        optimizer, self.schedule = make_optimizer(optim, 1)
        self.updates = 0  # optimiser updates so far
        f32 = functools.partial(trainable.cast_tree, dtype=jnp.float32)
        self.frozen = {"policy_base": jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), base),
                       "ref": f32(adapters["ref_policy"].params), "reward": f32(adapters["reward"].params),
                       "reward_head": f32(head_of["reward"])}
        params = {"policy": f32(adapters["policy"].params), "value": f32(adapters["value"].params),
                  "value_head": f32(head_of["value"])}
        self.state = create_state(params, optimizer, jax.random.PRNGKey(seed))
        self.rating_ids, self.multiple = rating_ids, self.cfg.ppo.reward_pad_multiple
        self.last_length = 0.0  # mean response tokens of the last rollout
        cut_ids = cut_ids if self.cfg.ppo.cut_at_question_mark else ()
        self._generate = jax.jit(functools.partial(rollout.generate_responses, spec, sampling, cut_ids))
        self._score = jax.jit(functools.partial(rollout.score_responses, spec, False))  # values: recompute_old
        self._recompute = jax.jit(functools.partial(rollout.recompute_old, spec))
        self._finish = jax.jit(functools.partial(rollout.finish_rollout, self.hyper, weights, response_len, EOS))
        self._step = jax.jit(functools.partial(ppo.ppo_step, spec, self.hyper, optimizer, self.schedule),
                             donate_argnums=(0,))

    def rollout(self, prompts: dict, seed: int, times: dict) -> Rollout:
        """Sampled, scored rollout with advantages (device arrays)."""
        from llava_jax.rl.batches import Prompts

        begin = time.perf_counter()
        batch = Prompts(**{k: jnp.asarray(v) for k, v in prompts.items()})
        params = self.state.params
        out = jax.block_until_ready(self._generate(self.frozen, params, batch, jax.random.PRNGKey(seed)))
        times["sampling"] = time.perf_counter() - begin
        begin = time.perf_counter()
        self.last_length = float(np.asarray(out.response_mask).sum(1).mean())
        host = {**prompts, "response": np.asarray(out.response), "response_mask": np.asarray(out.response_mask)}
        ids, mask = reward_inputs(host, self.rating_ids, self.multiple)
        # synthetic prompts: no multiple-choice answers
        out = out.replace(correct=jnp.zeros(len(ids), jnp.float32))
        out = self._score(self.frozen, params, out, jnp.asarray(ids), jnp.asarray(mask), None)
        out = self._recompute(self.frozen, params, out)
        out, _ = jax.block_until_ready(self._finish(out, jnp.float32(self.kl_coef)))
        times["scoring"] = time.perf_counter() - begin
        return out

    def update(self, rollout: Rollout, orders: list[np.ndarray], step_batch: int, times: dict) -> list[dict]:
        from llava_jax.rl import setup as ppo_setup

        begin = time.perf_counter()
        data = rollout.for_update()
        count = sum(-(-len(order) // step_batch) for order in orders)
        lrs = ppo_setup.update_learning_rates(self.schedule, self.updates, count)
        self.state, metrics = ppo_setup.minibatch_updates(self._step, self.state, self.frozen, data, orders,
                                                          step_batch, lrs)
        self.updates += count
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - begin
        return metrics

    def grad_norms(self, rollout: Rollout, rows: np.ndarray) -> dict[str, float]:
        """Each trained tree's gradient norm of the mean loss on rows `rows` (for the check)."""
        import optax

        from llava_jax.rl import ppo, setup as ppo_setup

        def loss(params: dict, minibatch: dict) -> jax.Array:
            total, aux = ppo.ppo_loss_sums(self.spec, self.hyper, params, self.frozen, minibatch, True)
            return total / jnp.maximum(aux["tokens"], 1.0)

        minibatch = ppo_setup.take_rows(rollout.for_update(), rows)
        # as the first update sees them: the params still the rollout's
        grads = jax.jit(jax.grad(loss))(self.state.params, minibatch)
        return {f"{k}_grad_norm": float(optax.tree.norm(g)) for k, g in grads.items()}

    def step(self, prompts: dict, seed: int, orders: list[np.ndarray], step_batch: int) -> tuple[dict, dict, list]:
        times: dict = {}
        rollout = self.rollout(prompts, seed, times)
        return times, rollout, self.update(rollout, orders, step_batch, times)
