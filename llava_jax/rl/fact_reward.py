"""The Fact-RLHF sequence score of a sampled response, term by term.

score = rm_weight x RM score (on the rating prompt with the image's captions, shuffled)
      + correct_bonus x correctness (multiple choice A-D: 1/0; yes/no items answered "No":
        +0.5 for a response starting with "No", -0.5 for one starting with "Yes")
      + length_bonus x (response tokens / response_len) x the item's length multiplier
      + no_stop_penalty when the response did not end with EOS.
The host side (text, and the reward model's inputs from the sampled ids) lives here; the RM
score itself is a jitted pass (roles.reward_model_scores) over the inputs `reward_inputs` builds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from llava_jax.data.records import correctness
from llava_jax.data.reward_prompt import RewardPrompt, reward_ids
from llava_jax.settings import PPOSettings


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """The score's weights: the `ppo` settings of the same names (defaults and docs in the
    settings tree), built from them by `from_settings` only; no defaults of their own."""
    rm_weight: float
    correct_bonus: float
    length_bonus: float
    no_stop_penalty: float

    @classmethod
    def from_settings(cls, p: PPOSettings) -> RewardWeights:
        return cls(rm_weight=p.rm_weight, correct_bonus=p.correct_bonus, length_bonus=p.length_bonus,
                   no_stop_penalty=p.no_stop_penalty)


def score_terms(rm_score: np.ndarray, correct: np.ndarray, length_fraction: np.ndarray, length_bonus: np.ndarray,
                has_stop: np.ndarray, weights: RewardWeights) -> dict[str, Any]:
    """Each weighted term [B] and their sum `score`; works on numpy and jax arrays."""
    terms = {
        "rm_score": weights.rm_weight * rm_score,
        "correct_bonus": weights.correct_bonus * correct,
        "length_penalty": weights.length_bonus * length_fraction * length_bonus,
        "no_stop_penalty": weights.no_stop_penalty * (1.0 - has_stop),
    }
    terms["score"] = sum(terms.values())
    return terms


def response_texts(tokens: np.ndarray, mask: np.ndarray, tokenizer: Any, eos_id: int | None) -> list[str]:
    """Decoded responses, EOS and anything after it dropped."""
    out = []
    for row, valid in zip(tokens, mask):
        ids = [int(t) for t, v in zip(row, valid) if v and t != eos_id]
        out.append(tokenizer.decode(ids))
    return out


def shuffled_captions(captions: Sequence[str] | None, seed: Sequence[int]) -> list[str] | None:
    """The item's captions in an order fixed by `seed` (so a resumed run sees the same)."""
    if not captions:
        return None
    order = np.random.default_rng(list(seed)).permutation(len(captions))
    return [captions[i] for i in order]


def reward_inputs(metas: Sequence[dict | None], query_ids: np.ndarray, query_mask: np.ndarray, responses: np.ndarray,
                  response_mask: np.ndarray, tokenizer: Any, prompt: RewardPrompt, *, with_facts: bool, template: str,
                  seed: Sequence[int], pad_id: int, pad_multiple: int = 64, length: int = 0, first_row: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, L], mask [B, L]) of the reward model's rating inputs, built from the ids as
    sampled: each row's query (left-padded [B, Q], in the reward tower's image layout), its
    response ([B, N] with its mask; it stopped when it holds EOS), then the rating text
    (`reward_prompt.reward_ids`). RIGHT padded to `length` (or to a multiple of
    `pad_multiple`: a few static shapes). Rows whose meta is None (padding rows) get a
    one-token dummy. Caption orders are drawn per (seed, global row): `first_row` is this
    process's first row in the global batch, so the draws do not depend on the process count."""
    rows = []
    for i, meta in enumerate(metas):
        if meta is None:
            rows.append(np.asarray([pad_id], np.int32))
            continue
        captions = shuffled_captions(meta.get("captions"), (*seed, first_row + i)) if with_facts else None
        response = responses[i][response_mask[i].astype(bool)]
        rows.append(reward_ids(query_ids[i][query_mask[i].astype(bool)], response,
                               bool(np.any(response == tokenizer.eos_id)), captions, tokenizer, prompt, template))
    longest = max(len(r) for r in rows)
    if length and longest > length:
        raise ValueError(f"a reward-model input of {longest} tokens exceeds the padded length {length}")
    width = length or -(-longest // pad_multiple) * pad_multiple
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def relayout_image_tokens(ids: np.ndarray, mask: np.ndarray, image_token_index: int, from_image_tokens: int,
                          num_image_tokens: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts with their image span resized to another tower's patch count
    (the value/reward base of the 7B recipe reads 576 patches where the policy reads 256)."""
    rows = []
    for row, valid in zip(ids, mask):
        tokens = row[valid.astype(bool)]
        is_image = tokens == image_token_index
        if is_image.any():
            first = int(np.argmax(is_image))
            count = int(is_image.sum())
            tokens = np.concatenate([tokens[:first], np.full(num_image_tokens, image_token_index, np.int32),
                                     tokens[first + count:]])
        rows.append(tokens)
    width = ids.shape[1] - from_image_tokens + num_image_tokens  # static: fixed by the two towers
    out = np.full((len(rows), width), pad_id, np.int32)
    out_mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = r
        out_mask[i, width - len(r):] = 1
    return out, out_mask
