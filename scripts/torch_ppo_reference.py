"""A PyTorch PPO step done the original LLaVA-RLHF way, for `scripts/bench_ppo.py --vs-hf`
(timed against ours, and checked against ours on one rollout) and its test.

One HF `LlavaForConditionalGeneration` carries four named PEFT adapters, switched with
`set_adapter` as the original switches `lora_policy`, `lora_value`, `lora_ref_policy` and
`lora_reward` over its reused base: `generate` samples with the policy adapter; then
teacher-forced passes give the old log-probs (policy), the values (value adapter + value
head), the reference log-probs (ref adapter) and the reward-model score (reward adapter +
reward head at the last position of a left-padded input). Every pass runs the whole model
from pixels (the vision tower included) and computes the logits, and the value pass keeps
the original's `0 * mean(logits)` term, so its backward runs through the LM head too.
Rewards are shaped with the per-token KL penalty, the score lands on the last position,
GAE runs over every position and the advantages are whitened over every position, pads
included (the original's layout: ours with `ppo.whiten_over_pads` and `ppo.loss_over_pads`).
The update: per minibatch, the policy loss's backward, then the value loss's, one
grad-norm clip over both adapters and the value head, one AdamW step.

Position ids are `max(cumsum(mask) - 1, 0)`, as our model computes them, so both sides see
the same positions (pads included: the value at a pad position enters the value loss).
Inputs and outputs are numpy; images NHWC like ours (transposed here).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class TorchPPOHyper:
    """The knobs, named as in configs/common.py (`from_config` copies them)."""

    response_len: int
    temperature: float = 1.0
    kl_coef: float = 0.1
    kl_estimator: str = "k1"  # k1 (clamped at 0) | k1_unclamped | k3
    reward_scale: float = 10.0
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    rm_weight: float = 1.0
    correct_bonus: float = 2.0
    length_bonus: float = -10.0
    no_stop_penalty: float = -8.0
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eos_id: int = 2
    pad_id: int = 0
    suppress_ids: tuple[int, ...] = ()  # ids the sampler must never emit (the image placeholder)
    cut_ids: tuple[int, ...] = ()  # the original's '?' ids: a response ends at the last listed one it holds

    @classmethod
    def from_config(cls, cfg, response_len: int, lr: float, **ids) -> "TorchPPOHyper":
        """From our ConfigDict's `ppo.*` and `optim.*` (the layout it implements is the
        original's: the config must keep `whiten_over_pads`, `loss_over_pads` and recomputed
        old log-probs)."""
        p, o = cfg.ppo, cfg.optim
        if not (p.whiten_over_pads and p.loss_over_pads and p.old_logprobs == "recompute"):
            raise ValueError("the torch reference implements the original's layout (configs/common.py defaults)")
        return cls(response_len=response_len, temperature=p.temperature, kl_coef=p.kl_coef,
                   kl_estimator=p.kl_estimator, reward_scale=p.reward_scale, whiten_rewards=p.whiten_rewards,
                   gamma=p.gamma, lam=p.lam, clip=p.clip, value_clip=p.value_clip, vf_coef=p.vf_coef,
                   rm_weight=p.rm_weight, correct_bonus=p.correct_bonus, length_bonus=p.length_bonus,
                   no_stop_penalty=p.no_stop_penalty, lr=lr, betas=(o.b1, o.b2), eps=o.eps,
                   weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
                   **{**ids, "cut_ids": tuple(ids.get("cut_ids", ())) if p.cut_at_question_mark else ()})


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """The original's whitening over every entry (population std)."""
    mean, std = x.mean(), x.std(unbiased=False)
    out = (x - mean) / (std + eps)
    return out if shift_mean else out + mean


def positions(mask: torch.Tensor) -> torch.Tensor:
    return torch.clamp(mask.long().cumsum(-1) - 1, min=0)


class TorchPPO:
    """The four roles over one HF base, and the PPO step on them (float32 or bfloat16)."""

    def __init__(self, hf_dir: str, adapters: dict[str, str], hyper: TorchPPOHyper, dtype: str = "float32",
                 device: str = "cpu") -> None:
        import peft
        import transformers
        from safetensors.torch import load_file

        self.hyper, self.device = hyper, torch.device(device)
        self.last_length = 0.0  # mean response tokens of the last `generate`
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        base = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=self.dtype)
        model = peft.PeftModel.from_pretrained(base, adapters["policy"], adapter_name="policy", is_trainable=True)
        model.load_adapter(adapters["value"], adapter_name="value", is_trainable=True)
        model.load_adapter(adapters["ref_policy"], adapter_name="ref_policy")
        model.load_adapter(adapters["reward"], adapter_name="reward")
        self.model = model.to(self.device)
        self.model.config.use_cache = False
        heads = {}
        for kind in ("value", "reward"):
            state = load_file(os.path.join(adapters[kind], f"{kind}_head.safetensors"))
            head = torch.nn.Linear(state["weight"].shape[1], 1).to(self.device, torch.float32)
            head.load_state_dict(state)
            heads[kind] = head
        self.value_head, self.reward_head = heads["value"], heads["reward"].requires_grad_(False)
        named = dict(self.model.named_parameters())
        self.groups = {role: [p for n, p in named.items() if f".{role}." in n] for role in ("policy", "value")}
        self.groups["value_head"] = list(self.value_head.parameters())
        self.params = [p for group in self.groups.values() for p in group]
        self.optimizer = torch.optim.AdamW(self.params, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                                           weight_decay=hyper.weight_decay)

    # --- passes ------------------------------------------------------------------------------------------------
    def _tensor(self, x: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(np.asarray(x), device=self.device).to(dtype)

    def _pixels(self, pixel_values: np.ndarray) -> torch.Tensor:
        return self._tensor(pixel_values, self.dtype).permute(0, 3, 1, 2).contiguous()

    def _forward(self, adapter: str, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor,
                 trainable: bool) -> Any:
        self.model.set_adapter(adapter, inference_mode=not trainable)
        return self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions(mask),
                          output_hidden_states=True, use_cache=False)

    def _sequence(self, rollout: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([self._tensor(rollout["query_ids"]), self._tensor(rollout["response"])], dim=1)
        mask = torch.cat([self._tensor(rollout["query_mask"]), self._tensor(rollout["response_mask"])], dim=1)
        return ids, mask

    def logprobs(self, adapter: str, rollout: dict, pixels: torch.Tensor,
                 trainable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs of the response tokens [B, N], 0 at pads as the original's ignore_index; entropies)."""
        ids, mask = self._sequence(rollout)
        n = rollout["response"].shape[1]
        logits = self._forward(adapter, ids, mask, pixels, trainable).logits[:, -n - 1:-1].float()
        logits = logits / self.hyper.temperature
        labels = ids[:, -n:].masked_fill(~self._tensor(rollout["response_mask"], torch.bool), -100)
        logp = -torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none",
                                                  ignore_index=-100)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        return logp, entropy

    def values(self, rollout: dict, pixels: torch.Tensor, trainable: bool = False) -> torch.Tensor:
        ids, mask = self._sequence(rollout)
        n = rollout["response"].shape[1]
        out = self._forward("value", ids, mask, pixels, trainable)
        hidden = out.hidden_states[-1] + 0.0 * out.logits.mean()  # the original's keep-every-parameter-used term
        return self.value_head(hidden[:, -n - 1:-1].float()).squeeze(-1)

    def rm_scores(self, reward_ids: np.ndarray, reward_mask: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
        """The reward model's score at the last position (inputs are left padded)."""
        out = self._forward("reward", self._tensor(reward_ids), self._tensor(reward_mask), pixels, False)
        return self.reward_head(out.hidden_states[-1][:, -1].float()).squeeze(-1)

    @torch.no_grad()
    def scores_of(self, rollout: dict, reward_inputs: Callable[[dict], tuple[np.ndarray, np.ndarray]]) -> dict:
        """Every rollout quantity this side computes, on a given rollout (sampled elsewhere):
        log-probs, ref log-probs, values, RM scores, and the advantages and returns of the
        rollout's own scores (so shaping, GAE and whitening are compared alone)."""
        pixels = self._pixels(rollout["pixel_values"])
        out = {"logprobs": self.logprobs("policy", rollout, pixels)[0].cpu().numpy(),
               "ref_logprobs": self.logprobs("ref_policy", rollout, pixels)[0].cpu().numpy(),
               "values": self.values(rollout, pixels).float().cpu().numpy(),
               "rm_raw": self.rm_scores(*reward_inputs(rollout), pixels).cpu().numpy()}
        return {**out, **self.advantages(rollout)}

    # --- rollout -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: dict, seed: int) -> dict:
        """Sampled responses [B, N] right padded, cut as the original cuts them, and their mask."""
        h = self.hyper
        torch.manual_seed(seed)
        self.model.set_adapter("policy")
        self.model.config.use_cache = True
        ids = self._tensor(prompts["query_ids"])
        out = self.model.generate(input_ids=ids, attention_mask=self._tensor(prompts["query_mask"]),
                                  pixel_values=self._pixels(prompts["pixel_values"]), do_sample=True,
                                  temperature=h.temperature, top_p=1.0, top_k=0, max_new_tokens=h.response_len,
                                  pad_token_id=h.pad_id, eos_token_id=h.eos_id,
                                  suppress_tokens=list(h.suppress_ids) or None)
        self.model.config.use_cache = False
        tokens = np.full((ids.shape[0], h.response_len), h.pad_id, np.int64)
        sampled = out[:, ids.shape[1]:].cpu().numpy()
        tokens[:, :sampled.shape[1]] = sampled
        valid = np.arange(h.response_len)[None] < sampled.shape[1]
        # truncate_after_eos_with_padding with the additional tokens: the first EOS, overridden
        # by the first occurrence of each cut id in turn.
        is_eos = (tokens == h.eos_id) & valid
        end = np.where(is_eos.any(1), is_eos.argmax(1), valid.sum(1) - 1)
        for token in h.cut_ids:
            hit = (tokens == token) & valid
            end = np.where(hit.any(1), hit.argmax(1), end)
        mask = valid & (np.arange(h.response_len)[None] <= end[:, None])
        self.last_length = float(mask.sum(1).mean())
        return {"response": np.where(mask, tokens, h.pad_id), "response_mask": mask}

    def score(self, rollout: dict) -> torch.Tensor:
        """Each response's sequence score (RM score + symbolic terms), as fact_reward.score_terms."""
        h, mask = self.hyper, self._tensor(rollout["response_mask"], torch.bool)
        length = mask.sum(-1).float() / h.response_len
        has_stop = ((self._tensor(rollout["response"]) == h.eos_id) & mask).any(-1).float()
        return (h.rm_weight * self._tensor(rollout["rm_raw"], torch.float32)
                + h.correct_bonus * self._tensor(rollout["correct"], torch.float32)
                + h.length_bonus * length * self._tensor(rollout["length_bonus"], torch.float32)
                + h.no_stop_penalty * (1.0 - has_stop))

    def advantages(self, rollout: dict) -> dict:
        """Shaped rewards, GAE (a Python loop over positions, as the original) and whitening."""
        h = self.hyper
        logp, ref = (self._tensor(rollout[k], torch.float32) for k in ("logprobs", "ref_logprobs"))
        values = self._tensor(rollout["values"], torch.float32)
        diff = logp - ref
        kl = {"k1": torch.clamp(diff, min=0.0), "k1_unclamped": diff, "k3": torch.expm1(-diff) + diff}[h.kl_estimator]
        kl = kl * self._tensor(rollout["response_mask"], torch.float32)
        shaped = -h.kl_coef * kl
        shaped[:, -1] += self.score(rollout)
        rewards = whiten(shaped, shift_mean=False) if h.whiten_rewards else shaped * h.reward_scale
        last, reversed_adv = 0.0, []
        n = rewards.shape[1]
        for t in reversed(range(n)):
            next_values = values[:, t + 1] if t < n - 1 else 0.0
            delta = rewards[:, t] + h.gamma * next_values - values[:, t]
            last = delta + h.gamma * h.lam * last
            reversed_adv.append(last)
        advantages = torch.stack(reversed_adv[::-1], dim=1)
        return {"advantages": whiten(advantages).cpu().numpy(), "returns": (advantages + values).cpu().numpy()}

    @torch.no_grad()
    def score_rollout(self, prompts: dict, generated: dict,
                      reward_inputs: Callable[[dict], tuple[np.ndarray, np.ndarray]]) -> dict:
        """Old log-probs and values (the policy's teacher-forced pass), ref log-probs, RM score,
        then the advantages and returns: a rollout ready for the update."""
        rollout = {**prompts, **generated}
        pixels = self._pixels(prompts["pixel_values"])
        rollout["logprobs"] = self.logprobs("policy", rollout, pixels)[0].cpu().numpy()
        rollout["values"] = self.values(rollout, pixels).float().cpu().numpy()
        rollout["ref_logprobs"] = self.logprobs("ref_policy", rollout, pixels)[0].cpu().numpy()
        reward_ids, reward_mask = reward_inputs(rollout)
        rollout["rm_raw"] = self.rm_scores(reward_ids, reward_mask, pixels).cpu().numpy()
        rollout.setdefault("correct", np.zeros(len(reward_ids), np.float32))
        rollout.update(self.advantages(rollout))
        return rollout

    # --- update ------------------------------------------------------------------------------------------------
    def loss_and_grads(self, minibatch: dict) -> dict:
        """The original's two backward passes on a minibatch (grads left in .grad) and the
        pre-clip grad norm; means over every [B, N] position."""
        h = self.hyper
        pixels = self._pixels(minibatch["pixel_values"])
        adv, ret = (self._tensor(minibatch[k], torch.float32) for k in ("advantages", "returns"))
        old_logp, old_values = (self._tensor(minibatch[k], torch.float32) for k in ("logprobs", "values"))
        old_logp = old_logp * self._tensor(minibatch["response_mask"], torch.float32)  # pads: 0, as ignore_index
        self.optimizer.zero_grad(set_to_none=True)
        logp, _ = self.logprobs("policy", minibatch, pixels, trainable=True)
        ratio = torch.exp(logp - old_logp)
        pg_loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - h.clip, 1.0 + h.clip)).mean()
        pg_loss.backward()
        vpred = self.values(minibatch, pixels, trainable=True)
        clipped = torch.clamp(vpred, old_values - h.value_clip, old_values + h.value_clip)
        vf_loss = 0.5 * torch.maximum((vpred - ret) ** 2, (clipped - ret) ** 2).mean()
        (h.vf_coef * vf_loss).backward()
        out = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item()}
        for name, group in (*self.groups.items(), ("", self.params)):
            norms = [torch.linalg.vector_norm(p.grad.float()) for p in group if p.grad is not None]
            out[f"{name}_grad_norm" if name else "grad_norm"] = torch.linalg.vector_norm(torch.stack(norms)).item()
        return out

    def update(self, rollout: dict, orders: list[np.ndarray], step_batch: int) -> list[dict]:
        """PPO epochs (one permutation of the rows each) of minibatch steps."""
        out = []
        for order in orders:
            for start in range(0, len(order), step_batch):
                rows = order[start:start + step_batch]
                metrics = self.loss_and_grads({k: v[rows] for k, v in rollout.items()})
                if self.hyper.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.hyper.max_grad_norm)
                self.optimizer.step()
                out.append(metrics)
        return out

    def step(self, prompts: dict, seed: int, reward_inputs: Callable[[dict], tuple[np.ndarray, np.ndarray]],
             orders: list[np.ndarray], step_batch: int) -> dict[str, float]:
        """One PPO step; seconds per phase."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        times, begin = {}, time.perf_counter()
        generated = self.generate(prompts, seed)
        sync()
        times["sampling"] = time.perf_counter() - begin
        begin = time.perf_counter()
        rollout = self.score_rollout(prompts, generated, reward_inputs)
        sync()
        times["scoring"] = time.perf_counter() - begin
        begin = time.perf_counter()
        self.update(rollout, orders, step_batch)
        sync()
        times["update"] = time.perf_counter() - begin
        return times
