"""The typed arrays of PPO, from the prompt chunk to the update: `Prompts` (what the loader
gives a rollout pass) and `Rollout` (what sampling, scoring and the advantages add, and
what the update reads). Both are pytrees (flax.struct): they pass through jit, shard and
concatenate like dicts did, and a field that is None (a second tower's inputs when the
roles share one base; scoring fields once the update batch is cut) holds no leaves.

Shapes: B rows (global batch, sharded over data x fsdp), Q query tokens (left padded, the
image placeholders expanded), N response tokens (right padded), V vision-feature tokens.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = Any  # jax.Array, or a host / abstract array where a test or the compile check builds one


@struct.dataclass
class Prompts:
    """A chunk of RL prompts on the devices."""

    query_ids: Array  # [B, Q] int32
    query_mask: Array  # [B, Q]
    pixel_values: Array  # [B, H, W, C] float32, CLIP-normalised, for the policy tower
    length_bonus: Array  # [B] float32: the item's length-penalty multiplier
    valid: Array  # [B]: 1 for real rows, 0 for the loader's padding rows
    reward_pixel_values: Array | None = None  # the reward tower's pixels, when it is another tower
    value_query_ids: Array | None = None  # [B, Q'] the query in the reward tower's image layout
    value_query_mask: Array | None = None

    @classmethod
    def from_loader(cls, host: dict, value_query: tuple[np.ndarray, np.ndarray] | None = None) -> Prompts:
        """A loader batch (host arrays) as Prompts; `value_query`: the query relaid for another tower."""
        other = value_query is not None
        return cls(query_ids=host["input_ids"], query_mask=host["attention_mask"], pixel_values=host["pixel_values"],
                   length_bonus=host["length_bonus"], valid=host["valid"],
                   reward_pixel_values=host["reward_pixel_values"] if other else None,
                   value_query_ids=value_query[0] if other else None,
                   value_query_mask=value_query[1] if other else None)


@struct.dataclass
class Rollout:
    """Sampled responses and what each pass adds. Sampling fills query, response, log-probs
    and features; scoring `ref_logprobs`, `rm_raw` (and `values`); the host `correct`;
    `finish_rollout` `score`, `rewards`, `advantages` and `returns`. `for_update()` keeps what
    the PPO update reads."""

    query_ids: Array = None  # [B, Q]
    query_mask: Array = None  # [B, Q]
    response: Array = None  # [B, N] int32, pads after the end
    response_mask: Array = None  # [B, N] bool
    logprobs: Array = None  # [B, N] the old policy's (sampler's, or recomputed), 0 at pads
    policy_features: Array = None  # [B, V, D] the policy tower's, reused by every pass
    values: Array = None  # [B, N] the old value estimates
    advantages: Array = None  # [B, N] whitened
    returns: Array = None  # [B, N]
    reward_features: Array | None = None  # [B, V', D'] the reward tower's, when it is another
    value_query_ids: Array | None = None  # [B, Q'] the query in the reward tower's image layout
    value_query_mask: Array | None = None
    # scoring only (dropped by for_update)
    ref_logprobs: Array | None = None  # [B, N]
    rm_raw: Array | None = None  # [B] the reward model's score
    correct: Array | None = None  # [B] the symbolic correctness
    length_bonus: Array | None = None  # [B]
    valid: Array | None = None  # [B]
    score: Array | None = None  # [B] the Fact-RLHF sequence score
    rewards: Array | None = None  # [B, N] shaped (and scaled or whitened)

    def for_update(self) -> Rollout:
        """What the PPO update reads (the scoring fields dropped)."""
        return self.replace(ref_logprobs=None, rm_raw=None, correct=None, length_bonus=None, valid=None, score=None,
                            rewards=None)

    @property
    def value_query(self) -> tuple[Array, Array]:
        """(ids, mask) of the query as the value / reward base reads it."""
        if self.value_query_ids is not None:
            return self.value_query_ids, self.value_query_mask
        return self.query_ids, self.query_mask

    @property
    def value_features(self) -> Array:
        """The vision features of the tower under the value and reward models."""
        return self.reward_features if self.reward_features is not None else self.policy_features


def concat_rows(chunks: list[Rollout]) -> Rollout:
    """The chunks' rows, in order, as one rollout batch."""
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *chunks)
