"""The four PPO roles over shared frozen bases, and what each computes.

`policy` (trains) and `ref_policy` (frozen) are adapters over the policy base; `value`
(trains, adapter + value head) and `reward` (frozen, adapter + reward head) are adapters
over the reward base, which is the policy base itself when `shared_base` (13B recipe,
tiny), or a second base with its own vision tower (7B recipe: 7B-224 policy, 13B-336
reward). Each tower runs once per rollout batch; its features are kept in the rollout and
passed to every role on that tower.

Trees: `frozen = {"policy_base", "reward_base" (only when not shared), "ref", "reward",
"reward_head"}`; the trainable `params = {"policy", "value", "value_head"}`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llava_jax.models import heads
from llava_jax.models.lora import Adapter, LoraConfig, forward
from llava_jax.train.losses import token_logprobs
from llava_jax.models.llava import LlavaConfig
from llava_jax.rl.batches import Rollout

# Response positions per LM-head call in `response_logprobs`: at the 13B recipe's 896 positions
# and 32000 words, 7 chunks whose float32 logits are 1/7 of the whole.
LOGPROB_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class PPOSpec:
    """Static description of the roles (hashable: a jit static argument)."""

    policy_config: LlavaConfig
    policy_lora: LoraConfig  # policy and ref_policy
    reward_config: LlavaConfig
    value_lora: LoraConfig
    reward_lora: LoraConfig
    shared_base: bool  # value/reward run over the policy base (one base, one tower)
    temperature: float = 1.0  # log-probs are of logits / temperature, as sampled


def reward_base(spec: PPOSpec, frozen: dict) -> dict:
    return frozen["policy_base"] if spec.shared_base else frozen["reward_base"]


def vision_features(config: LlavaConfig, base: dict, pixel_values: jax.Array) -> jax.Array:
    """The frozen tower's features, computed once and reused by every role on it."""
    return forward(config, base, None, pixel_values, method="vision_features")


def _response_hidden(config: LlavaConfig, base: dict, adapter: Adapter, query_ids: jax.Array, query_mask: jax.Array,
                     response: jax.Array, response_mask: jax.Array, features: jax.Array) -> jax.Array:
    """Hidden states [B, N, D] at the positions that predict each response token (the
    state before each action): query length Q, response N -> positions Q-1 .. Q+N-2."""
    ids = jnp.concatenate([query_ids, response], axis=1)
    mask = jnp.concatenate([query_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
    hidden = forward(config, base, adapter, ids, None, mask, method="hidden", vision_features=features)
    q, n = query_ids.shape[1], response.shape[1]
    return hidden[:, q - 1:q + n - 1]


def response_logprobs(spec: PPOSpec, base: dict, adapter_params: dict, batch: Rollout,
                      features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probs of the response tokens [B, N], entropy of each step's distribution [B, N])
    under log_softmax(logits / temperature), for the policy or the reference policy.

    The head runs over LOGPROB_CHUNK positions at a time (losses.token_logprobs), so the
    [B, N, vocab] float32 logits are never whole; the entropy is a metric (no gradient)."""
    adapter = Adapter(adapter_params, spec.policy_lora)
    hidden = _response_hidden(spec.policy_config, base, adapter, batch.query_ids, batch.query_mask, batch.response,
                              batch.response_mask, features)
    head = lambda h: forward(spec.policy_config, base, adapter, h, method="logits")  # noqa: E731
    return token_logprobs(head, hidden, batch.response, temperature=spec.temperature, chunk=LOGPROB_CHUNK)


def response_values(spec: PPOSpec, base: dict, adapter_params: dict, head: dict, batch: Rollout,
                    features: jax.Array) -> jax.Array:
    """Value of the state before each response token [B, N] (value adapter + value head).
    The value base reads the query in its own image layout (`value_query_*` when its tower
    has another patch count)."""
    query_ids, query_mask = batch.value_query
    hidden = _response_hidden(spec.reward_config, base, Adapter(adapter_params, spec.value_lora), query_ids,
                              query_mask, batch.response, batch.response_mask, features)
    return heads.token_values(head, hidden)


def reward_model_scores(spec: PPOSpec, base: dict, adapter_params: dict, head: dict, reward_ids: jax.Array,
                        reward_mask: jax.Array, features: jax.Array) -> jax.Array:
    """The reward model's score [B] of each rating prompt, read at its last token."""
    hidden = forward(spec.reward_config, base, Adapter(adapter_params, spec.reward_lora), reward_ids, None,
                     reward_mask, method="hidden", vision_features=features)
    return heads.reward_scores(head, hidden, reward_mask)
