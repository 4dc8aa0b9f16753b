"""PPO rollouts: sample responses to a batch of prompts, score them with every role, and
turn the scores into advantages.

Per chunk of prompts (a loader batch; `ppo.rollout_batch` is several chunks when memory
asks for it): one jitted pass runs the policy tower once, samples with the KV-cache
sampler (log-probs kept) and, as the original, optionally cuts each response at its '?'
token (`cut_responses`); the host decodes the responses, checks correctness and builds
the reward model's rating prompts (captions shuffled with a seed fixed by step, chunk and
process, so a resumed run rebuilds the same inputs); a second jitted pass computes the
reference log-probs, the values and the RM score (the reward tower, when it is another
one, runs once there); with `recompute_logprobs` a third pass, the update's own forward,
gives the old log-probs and values (the original's teacher-forced pass; otherwise the
sampler's log-probs). Then the whole rollout batch gets its rewards, GAE advantages and
returns in one jitted pass, so the whitening statistics are those of the global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import sharding
from llava_jax.rl import fact_reward, ppo, roles
from llava_jax.models.lora import Adapter
from llava_jax.generate.sampling import SamplingConfig, generate
from llava_jax.rl.batches import Prompts, Rollout, concat_rows

@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """The rollout's settings, built from the run's in one place (rl/loop.py); no defaults."""

    sampling: SamplingConfig
    weights: fact_reward.RewardWeights
    with_facts: bool  # ppo.with_facts
    template: str  # data.template
    pad_multiple: int  # ppo.reward_pad_multiple
    seed: int
    cut_ids: tuple[int, ...]  # the original's '?' cut (cut_responses); () = none
    recompute_logprobs: bool  # old log-probs and values from the update's forward (the original)


def cut_responses(tokens: jax.Array, mask: jax.Array, logprobs: jax.Array, cut_ids: tuple[int, ...],
                  pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LLaVA-RLHF's `truncate_after_eos_with_padding` with its additional tokens: the response
    ends at its first EOS, or, overriding that, at the first occurrence of each of
    `cut_ids` in turn (the last one present wins, even if an earlier listed id comes first);
    the cut token is kept and what follows becomes padding. A response cut at '?' has lost its
    EOS, so it counts as not stopped."""
    n = tokens.shape[1]
    position = jnp.arange(n)[None]
    end = jnp.sum(mask, axis=-1) - 1  # our sampler already ends a response at its EOS
    for token in cut_ids:
        hit = (tokens == token) & mask
        first = jnp.min(jnp.where(hit, position, n), axis=-1)
        end = jnp.where(first < n, first, end)
    keep = mask & (position <= end[:, None])
    return jnp.where(keep, tokens, pad_id), keep, jnp.where(keep, logprobs, 0.0)


def generate_responses(spec: roles.PPOSpec, sampling: SamplingConfig, cut_ids: tuple[int, ...], frozen: dict,
                       params: dict, prompts: Prompts, rng: jax.Array) -> Rollout:
    """Policy tower features (kept for every later pass) and sampled responses."""
    base = frozen["policy_base"]
    features = roles.vision_features(spec.policy_config, base, prompts.pixel_values)
    out = generate(spec.policy_config, base, Adapter(params["policy"], spec.policy_lora), prompts.query_ids,
                   prompts.query_mask, None, rng, sampling, vision_features=features)
    tokens, mask, logprobs = out["tokens"], out["mask"], out["logprobs"]
    if cut_ids:
        tokens, mask, logprobs = cut_responses(tokens, mask, logprobs, cut_ids, sampling.pad_id)
    return Rollout(query_ids=prompts.query_ids, query_mask=prompts.query_mask, response=tokens, response_mask=mask,
                   logprobs=logprobs, policy_features=features, value_query_ids=prompts.value_query_ids,
                   value_query_mask=prompts.value_query_mask, length_bonus=prompts.length_bonus, valid=prompts.valid)


def score_responses(spec: roles.PPOSpec, with_values: bool, frozen: dict, params: dict, rollout: Rollout,
                    reward_ids: jax.Array, reward_mask: jax.Array, reward_pixel_values: jax.Array | None) -> Rollout:
    """Reference log-probs, the RM score of the rating prompts `reward_ids` and (`with_values`)
    the values of sampled responses; `reward_pixel_values` only when the reward tower is another."""
    ref_logprobs, _ = roles.response_logprobs(spec, frozen["policy_base"], frozen["ref"], rollout,
                                              rollout.policy_features)
    rollout = rollout.replace(ref_logprobs=ref_logprobs)
    if not spec.shared_base:
        rollout = rollout.replace(reward_features=roles.vision_features(spec.reward_config, frozen["reward_base"],
                                                                        reward_pixel_values))
    base, features = roles.reward_base(spec, frozen), rollout.value_features
    if with_values:
        rollout = rollout.replace(values=roles.response_values(spec, base, params["value"], params["value_head"],
                                                               rollout, features))
    return rollout.replace(rm_raw=roles.reward_model_scores(spec, base, frozen["reward"], frozen["reward_head"],
                                                            reward_ids, reward_mask, features))


def recompute_old(spec: roles.PPOSpec, frozen: dict, params: dict, rollout: Rollout) -> Rollout:
    """The rollout's old log-probs and values by the update's own forward (the original's
    teacher-forced pass); while the policy is unchanged the update takes its own (ppo_loss_sums)."""
    logprobs, _, values = ppo.policy_value_outputs(spec, params, frozen, rollout)
    return rollout.replace(logprobs=jnp.where(rollout.response_mask, logprobs, 0.0), values=values)


def finish_rollout(hyper: ppo.PPOHyper, weights: fact_reward.RewardWeights, response_len: int, eos_id: int,
                   rollout: Rollout, kl_coef: jax.Array) -> tuple[Rollout, dict]:
    """Score terms, shaped rewards, advantages and returns of the whole (global) batch."""
    mask = rollout.response_mask.astype(bool)
    length = jnp.sum(mask, axis=-1).astype(jnp.float32)
    has_stop = jnp.any((rollout.response == eos_id) & mask, axis=-1).astype(jnp.float32)
    terms = fact_reward.score_terms(rollout.rm_raw, rollout.correct, length / response_len, rollout.length_bonus,
                                    has_stop, weights)
    rollout = rollout.replace(score=terms["score"])
    rollout, metrics = ppo.compute_advantages(hyper, rollout, kl_coef)
    row_mean = functools.partial(ppo.masked_mean, mask=rollout.valid.astype(bool))
    metrics.update({k: row_mean(v) for k, v in terms.items() if k != "score"})
    metrics.update(response_length=row_mean(length), stop_rate=row_mean(has_stop),
                   correct_rate=row_mean(rollout.correct))
    return rollout, metrics


def jit_generate(spec: roles.PPOSpec, sampling: SamplingConfig, cut_ids: tuple[int, ...], frozen_sh: Any) -> Any:
    """`generate_responses(frozen, params, prompts, rng)` jitted, the frozen trees in their shardings
    (the PPO loop's and the compile check's one builder)."""
    return jax.jit(functools.partial(generate_responses, spec, sampling, cut_ids),
                   in_shardings=(frozen_sh, None, None, None))


def jit_score(spec: roles.PPOSpec, with_values: bool, frozen_sh: Any) -> Any:
    """`score_responses(frozen, params, rollout, reward_ids, reward_mask, reward_pixel_values)` jitted."""
    return jax.jit(functools.partial(score_responses, spec, with_values),
                   in_shardings=(frozen_sh, None, None, None, None, None))


class Rollouts:
    """Jitted rollout passes for one run, and the host work between them."""

    def __init__(self, spec: roles.PPOSpec, hyper: ppo.PPOHyper, rcfg: RolloutConfig, tokenizer: Any,
                 prompt: Any, mesh: Any, frozen_sh: Any):
        self.spec, self.hyper, self.rcfg, self.tokenizer, self.prompt, self.mesh = spec, hyper, rcfg, tokenizer, prompt, mesh
        self._generate = jit_generate(spec, rcfg.sampling, rcfg.cut_ids, frozen_sh)
        self._score = jit_score(spec, not rcfg.recompute_logprobs, frozen_sh)
        self._recompute = jax.jit(functools.partial(recompute_old, spec), in_shardings=(frozen_sh, None, None))
        self._finish = jax.jit(functools.partial(finish_rollout, hyper, rcfg.weights, rcfg.sampling.max_new_tokens,
                                                 rcfg.sampling.eos_id))
        self._concat = jax.jit(concat_rows)

    def chunk(self, frozen: dict, params: dict, host: dict, rng: jax.Array, seed: tuple[int, ...],
              timings: dict) -> tuple[Rollout, list[dict]]:
        """Samples and scores one loader batch; returns the scored rollout and per-row samples."""
        spec, rcfg = self.spec, self.rcfg
        value_query = None
        if not spec.shared_base:  # the reward tower's view of the query: its own image layout
            n_from, n_to = spec.policy_config.num_image_tokens, spec.reward_config.num_image_tokens
            value_query = fact_reward.relayout_image_tokens(host["input_ids"], host["attention_mask"],
                                                            spec.reward_config.image_token_index, n_from, n_to,
                                                            self.tokenizer.pad_id)
        prompts = Prompts.from_loader(host, value_query)
        begin = time.perf_counter()
        prompts = sharding.batch_to_device(prompts, self.mesh)
        rollout = jax.block_until_ready(self._generate(frozen, params, prompts, rng))
        timings["generate"] += time.perf_counter() - begin

        begin = time.perf_counter()
        tokens, mask = sharding.local_rows(rollout.response), sharding.local_rows(rollout.response_mask)
        texts = fact_reward.response_texts(tokens, mask, self.tokenizer, rcfg.sampling.eos_id)
        metas = host["meta"]
        correct = np.asarray([fact_reward.correctness(t, c) for t, c in zip(texts, host["caption_type"])], np.float32)
        query = value_query or (host["input_ids"], host["attention_mask"])
        build = functools.partial(fact_reward.reward_inputs, metas, *query, tokens, mask, self.tokenizer, self.prompt,
                                  with_facts=rcfg.with_facts, template=rcfg.template, seed=seed,
                                  pad_id=self.tokenizer.pad_id, first_row=jax.process_index() * len(metas))
        reward_ids, reward_mask = build(pad_multiple=rcfg.pad_multiple)
        width = sharding.max_over_processes(reward_ids.shape[1])
        if width > reward_ids.shape[1]:
            reward_ids, reward_mask = build(length=width)
        extra = sharding.batch_to_device({"reward_ids": reward_ids, "reward_mask": reward_mask, "correct": correct},
                                         self.mesh)
        rollout = self._score(frozen, params, rollout.replace(correct=extra["correct"]), extra["reward_ids"],
                              extra["reward_mask"], prompts.reward_pixel_values)
        if self.rcfg.recompute_logprobs:
            rollout = self._recompute(frozen, params, rollout)
        jax.block_until_ready(rollout)
        timings["score"] += time.perf_counter() - begin
        samples = [{"id": m.get("id") if m else None, "image": m.get("image") if m else None,
                    "question": m.get("question") if m else None, "caption_type": int(ct), "response": t,
                    "correct": float(c)} for m, t, c, ct in zip(metas, texts, correct, host["caption_type"])]
        if samples:  # the first row's full reward-model input, to see what the RM read
            samples[0]["reward_input"] = self.tokenizer.decode(
                [int(i) for i, v in zip(reward_ids[0], reward_mask[0]) if v and i != spec.reward_config.image_token_index])
        return rollout, samples

    def collect(self, frozen: dict, params: dict, batches: list[dict], step: int, kl_coef: float,
                timings: dict) -> tuple[Rollout, dict, list[dict]]:
        """The scored rollout batch (with advantages, as the update reads it), its metrics and samples."""
        chunks, samples = [], []
        for c, host in enumerate(batches):
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.rcfg.seed), step), c)
            rollout, rows = self.chunk(frozen, params, host, rng, (self.rcfg.seed, step, c), timings)
            chunks.append(rollout)
            samples += rows
        begin = time.perf_counter()
        rollout = chunks[0] if len(chunks) == 1 else self._concat(chunks)
        rollout, metrics = self._finish(rollout, jnp.float32(kl_coef))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timings["score"] += time.perf_counter() - begin
        score = sharding.local_rows(rollout.score)
        for row, value in zip(samples, score):
            row["score"] = float(value)
        return rollout.for_update(), metrics, samples


def write_samples(workdir: str, step: int, samples: list[dict]) -> None:
    """workdir/rollouts/step_N.jsonl: what the policy said and what it earned."""
    directory = os.path.join(workdir, "rollouts")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"step_{step:06d}.jsonl"), "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
