"""Flash attention for whole sequences (training, scoring, prefill), `model.attention = "flash"`.

Causal self-attention with key padding, never materialising the [B, H, T, T] scores:

* TPU: the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`), causal mask,
  padding as segment ids (valid tokens segment 1, pads 0: a valid query sees only valid keys),
  the sequence padded up to the kernel's block. Run per device under `shard_map` (batch over
  data x fsdp, heads over tensor), as a Mosaic kernel cannot be partitioned by the compiler.
* GPU: `jax.nn.dot_product_attention(implementation="cudnn")`, causal, with the key mask
  (compiled for sm_90 from a CPU host by `compile_check --target h100-8`).
* CPU: the splash kernel in Pallas interpret mode, for checking numerics against the XLA path
  (slow: not for training on CPU).

Pad queries attend only to pad keys here (the XLA path gives them a masked-out average); those
rows are never read. The sampler (its prefill over the KV cache, then one query per step) stays
on the XLA path: what flash saves is the [B, H, T, T] scores and their backward in training
and scoring passes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

BLOCK = 128


def compile_platform() -> str:
    """The platform a trace is for: the set mesh's devices ("tpu" for a slice compiled for
    from a CPU host), else the default backend. Picks the kernel that can run there (a Mosaic
    kernel does not compile for a GPU); it tunes no shapes."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                    backend: str | None = None) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, K, T, D] (H % K == 0); key_valid: bool [B, T] (the
    attention mask). Causal. Returns [B, T, H, D] in q's dtype."""
    backend = backend or compile_platform()
    if backend in ("gpu", "cuda", "rocm"):
        return _cudnn(q, k, v, key_valid)
    return _sharded_splash(q, k, v, key_valid, interpret=backend != "tpu")


def _cudnn(q, k, v, key_valid):
    groups = q.shape[2] // k.shape[1]
    k, v = (jnp.repeat(x, groups, axis=1).transpose(0, 2, 1, 3) for x in (k, v))  # [B, T, H, D]
    b, t = key_valid.shape
    # cuDNN takes the mask as a bias of the full [B, 1, T, T] (a [B, 1, 1, T] key mask stops the
    # trace: "Bias must have same seq length as QKV"); one per batch row, not per head. Not
    # seq lengths: those mean right padding, and these rows are left padded.
    mask = jnp.broadcast_to(key_valid.astype(bool)[:, None, None, :], (b, 1, t, t))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _sharded_splash(q, k, v, key_valid, interpret: bool):
    run = functools.partial(_splash, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, key_valid)
    batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
    heads = "tensor" if "tensor" in mesh.axis_names else None
    specs = (PartitionSpec(batch, None, heads, None), PartitionSpec(batch, heads, None, None),
             PartitionSpec(batch, heads, None, None), PartitionSpec(batch, None))
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(q, k, v, key_valid)


def _splash(q, k, v, key_valid, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    groups = h // k.shape[1]
    block = BLOCK  # the kernel's tiles are multiples of the 128 lanes
    padded = -(-t // block) * block
    extra = padded - t
    q = (q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, D]
    k, v = (jnp.repeat(x, groups, axis=1) for x in (k, v))
    if extra:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (q, k, v))
        key_valid = jnp.pad(key_valid, ((0, 0), (0, extra)))
    segments = key_valid.astype(jnp.int32)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((padded, padded)) for _ in range(h)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(s1, s1)))(q, k, v, segments)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)
