"""Next-token cross-entropy fused with the LM head, computed on target positions only.

With a 32000-word vocabulary the head is a third of a small LLaVA's training FLOPs, and
autodiff through `log_softmax` + `take_along_axis` walks the [B, T, V] logits about eight
times. `head_cross_entropy` gives the same sums (loss, targets, argmax hits) for less:

* Only positions with a target get logits. A stable sort moves each row's target positions
  to the front; the head then runs over chunks of T / `buckets` sorted slots, one chunk per
  iteration of a loop that stops after the largest per-row target count. Image, prompt and
  pad positions, often a fifth to a half of an SFT batch, cost nothing; the compiler sees
  one chunk's program (a `lax.switch` over every bucket size compiled T / chunk + 1 copies of
  the head: twice the tiny SFT step's compile time); at most one chunk's [B, T / buckets, V]
  logits are live at a time.
* The loss is a plain sum, so its gradient w.r.t. the logits (softmax - onehot) is known in
  the forward pass. Under differentiation the forward pass also forms both head gradients,
  so no [B, M, V] array survives into the backward pass, and inputs that are not
  differentiated (a frozen head under LoRA) get no gradient matmul at all.

The arithmetic per token mirrors `jax.nn.log_softmax` (shift by the max, subtract the log of
the summed exponentials) and the head matmul runs in the model's compute dtype, as in
`Llama.logits`; float32 results match the unfused loss to rounding.

`token_logprobs` is the PPO counterpart: the log-prob of a given token and the entropy at
every position, not a sum, so the cotangent per token is only known in the backward pass.
It runs the head over position chunks in a `lax.map` whose chunk function is rematerialised
(`jax.checkpoint`): the backward pass recomputes one chunk's logits at a time, and no
[B, N, V] array is live in either pass.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from llava_jax.data.templates import IGNORE_INDEX


def next_token_targets(labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], mask [B, T]): position t predicts labels[:, t + 1]; the last predicts nothing."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    return targets, (targets != IGNORE_INDEX) & (weights[:, None] > 0)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over weighted next-token targets, number of targets) on full logits [B, T, V]:
    the plain formulation `head_cross_entropy` must equal (tests compare the two)."""
    targets, mask = next_token_targets(labels, weights)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(mask, picked, 0.0)), jnp.sum(mask).astype(jnp.float32)


def head_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, weights: jax.Array, *,
                       tied: bool = False, dtype: Any = jnp.float32, buckets: int = 16
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE over next-token targets, number of targets, number the argmax gets right).

    hidden: final normed states [B, T, D]; kernel: the head [D, V], or with `tied` the
    embedding [V, D]; labels [B, T] (-100: no target); weights [B] (0: item ignored);
    buckets: the sorted positions run in chunks of T / buckets (rounded up).
    """
    targets, mask = next_token_targets(labels, weights)
    t = hidden.shape[1]
    chunk = -(-t // max(1, min(buckets, t)))
    order = jnp.argsort(~mask, axis=1, stable=True)  # target positions first, in order
    chunks = -(-jnp.max(jnp.sum(mask, axis=1)) // chunk)
    ce, correct = _fused(chunk, tied, jnp.dtype(dtype).name, hidden, kernel, targets, mask, order,
                         chunks.astype(jnp.int32))
    return ce, jnp.sum(mask).astype(jnp.float32), correct


def token_logprobs(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, tokens: jax.Array, *,
                   temperature: float = 1.0, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """(log p(tokens) [B, N], entropy [B, N]) under log_softmax(logits_fn(hidden) / temperature).

    logits_fn: the LM head, states [B, C, D] -> logits [B, C, V] (any params it closes over
    get gradients); hidden [B, N, D]; tokens [B, N]; chunk: positions per head call (the last
    chunk is padded). The log-probs are differentiable; the entropy is a metric and carries
    no gradient, so the backward pass never forms its [B, C, V] terms.
    """
    b, n, d = hidden.shape
    chunk = max(1, min(chunk, n))
    k = -(-n // chunk)
    pad = k * chunk - n  # padded positions read token 0 of zero states; sliced off below
    hs = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, k, chunk, d).swapaxes(0, 1)
    ts = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(b, k, chunk).swapaxes(0, 1)

    # Without the remat the map would keep every chunk's softmax for the backward pass: the
    # full [B, N, V] again. prevent_cse is only needed outside loops.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, t = xs
        logp_all = jax.nn.log_softmax(logits_fn(h).astype(jnp.float32) / temperature, axis=-1)
        logp = jnp.take_along_axis(logp_all, t[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return logp, jax.lax.stop_gradient(entropy)

    logp, entropy = jax.lax.map(one_chunk, (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, k * chunk)[:, :n]  # noqa: E731
    return unchunk(logp), unchunk(entropy)


def _chunk_terms(rows, tied: bool, dtype: str, want_grads: bool, hidden, w, targets, mask) -> tuple:
    """ce, correct (and the logits' gradient [B, C, V], the gathered states [B, C, D] when
    wanted) of the positions `rows` [B, C] (masked where `mask` [B, C] is False)."""
    hs = jnp.take_along_axis(hidden, rows[..., None], axis=1).astype(dtype)
    ts = jnp.take_along_axis(targets, rows, axis=1)
    logits = jnp.einsum("bmd,vd->bmv" if tied else "bmd,dv->bmv", hs, w).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    top = jnp.max(logits, axis=-1, keepdims=True)
    shifted = logits - top
    log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    safe = jnp.where(mask, ts, 0)[..., None]
    target_shifted = jnp.take_along_axis(shifted, safe, axis=-1)
    ce = -jnp.sum(jnp.where(mask, (target_shifted - log_sum)[..., 0], 0.0))  # -log p(target)
    correct = jnp.sum(mask & (jnp.argmax(logits, axis=-1) == ts)).astype(jnp.float32)  # the first maximum
    if not want_grads:
        return ce, correct
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    dlogits = jnp.exp(shifted - log_sum) - (vocab == safe).astype(jnp.float32)  # softmax - onehot
    return ce, correct, jnp.where(mask[..., None], dlogits, 0.0).astype(dtype), hs


def _chunked(chunk, tied, dtype, want_dh, want_dw, hidden, kernel, targets, mask, order, chunks) -> tuple:
    """ce, correct (and dh [B, T, D], dw like kernel when wanted) over the first `chunks`
    chunks of sorted positions, one chunk per loop iteration."""
    b, t, d = hidden.shape
    padded = -(-t // chunk) * chunk  # the last chunk may reach past T: its extra slots are masked
    # `order` puts each row's targets first, so sorted slot j holds a target iff j < the row's count.
    sorted_mask = jnp.arange(padded)[None] < jnp.sum(mask, axis=1, keepdims=True)
    order = jnp.pad(order, ((0, 0), (0, padded - t)))
    w = kernel.astype(dtype)
    zero = jnp.zeros((), jnp.float32)
    carry = {"ce": zero, "correct": zero}
    if want_dh:  # the states' gradient in sorted order; unsorted once after the loop
        carry["dh"] = jnp.zeros((b, padded, d), hidden.dtype)
    if want_dw:  # summed over chunks in float32
        carry["dw"] = jnp.zeros(kernel.shape, jnp.float32)

    def body(k, carry):
        rows = jax.lax.dynamic_slice_in_dim(order, k * chunk, chunk, axis=1)
        ms = jax.lax.dynamic_slice_in_dim(sorted_mask, k * chunk, chunk, axis=1)
        out = _chunk_terms(rows, tied, dtype, want_dh or want_dw, hidden, w, targets, ms)
        new = {"ce": carry["ce"] + out[0], "correct": carry["correct"] + out[1]}
        if want_dh:
            dhs = jnp.einsum("bmv,vd->bmd" if tied else "bmv,dv->bmd", out[2], w).astype(hidden.dtype)
            new["dh"] = jax.lax.dynamic_update_slice_in_dim(carry["dh"], dhs, k * chunk, axis=1)
        if want_dw:
            spec = "bmv,bmd->vd" if tied else "bmd,bmv->dv"
            operands = (out[2], out[3]) if tied else (out[3], out[2])
            new["dw"] = carry["dw"] + jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)
        return new

    carry = jax.lax.fori_loop(0, chunks, body, carry)
    out = (carry["ce"], carry["correct"])
    if want_dh:
        back = jnp.argsort(order[:, :t], axis=1)  # sorted slot of each position
        out += (jnp.take_along_axis(carry["dh"], back[..., None], axis=1),)
    if want_dw:
        out += (carry["dw"].astype(kernel.dtype),)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(chunk, tied, dtype, hidden, kernel, targets, mask, order, chunks):
    return _chunked(chunk, tied, dtype, False, False, hidden, kernel, targets, mask, order, chunks)


def _fused_fwd(chunk, tied, dtype, hidden, kernel, targets, mask, order, chunks):
    # symbolic_zeros: each argument arrives as (value, perturbed); unperturbed ones need no gradient.
    want_dh, want_dw = hidden.perturbed, kernel.perturbed
    out = _chunked(chunk, tied, dtype, want_dh, want_dw, hidden.value, kernel.value, targets.value, mask.value,
                   order.value, chunks.value)
    grads = list(out[2:])
    dh = grads.pop(0) if want_dh else None
    dw = grads.pop(0) if want_dw else None
    return out[:2], (dh, dw)


def _fused_bwd(chunk, tied, dtype, res, cts):
    dh, dw = res
    ct = cts[0]
    if isinstance(ct, SymbolicZero):
        return None, None, None, None, None, None
    scale = lambda g: None if g is None else (g * ct.astype(g.dtype))  # noqa: E731
    return scale(dh), scale(dw), None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
