"""Batched answers to an eval question file: the one generation loop (and model loading)
behind `scripts/generate.py`, `scripts/eval_toy.py` and the toy-world evaluation
(`llava_jax/eval/toy_eval.py`)."""
from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from llava_jax import sharding

from llava_jax.data import EvalDataset, Loader
from llava_jax.data.eval_data import EvalQuestion
from llava_jax.generate.sampling import SamplingConfig, generate_fn
from llava_jax.settings import cpu_shapes_on


def _put_batch(value: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host batch array laid out over `mesh`: rows over (data, fsdp) where they divide, else
    replicated (the weights stay sharded either way)."""
    logical = PartitionSpec("batch", *([None] * (np.ndim(value) - 1)))
    return jax.device_put(value, sharding.shardings_for(value, logical, mesh))


def answer_batches(config: Any, base: dict, adapter: Any, tokenizer: Any, dataset: EvalDataset,
                   sampling: SamplingConfig, batch_size: int, seed: int = 0, *, mesh: Mesh
                   ) -> Iterator[list[tuple[EvalQuestion, str, int]]]:
    """Per loader batch: (question, answer text, answer tokens) of its valid rows, in file order.
    `adapter` None answers with the base model. The weights (laid out over `mesh`, e.g. by
    `load_answering_model`), the prompts and the KV cache are sharded over `mesh`, as in
    training. Prompts are left padded to the loader's bucket lengths (a few compiled shapes)."""
    run = generate_fn(config, sampling)
    loader = Loader(dataset, batch_size, shuffle=False, num_epochs=1, drop_remainder=False, pad_side="left",
                    process_index=0, process_count=1)
    rng = jax.random.PRNGKey(seed)
    try:
        with jax.set_mesh(mesh), sharding.activation_rules():  # the cache's logical constraints see the mesh
            for batch in loader:
                rng, key = jax.random.split(rng)
                inputs = [None if batch[k] is None else _put_batch(batch[k], mesh)
                          for k in ("input_ids", "attention_mask", "pixel_values")]
                out = run(base, adapter, *inputs, key)
                tokens, mask = np.asarray(out["tokens"]), np.asarray(out["mask"]).astype(bool)
                rows = []
                for row, (valid, meta) in enumerate(zip(batch["valid"], batch["meta"])):
                    if valid and meta is not None:
                        ids = [int(t) for t in tokens[row][mask[row]] if t != sampling.eos_id]
                        rows.append((meta["question"], tokenizer.decode(ids).strip(), len(ids)))
                yield rows
    finally:
        loader.close()


def load_answering_model(ckpt: str, adapter: str | None = None, dtype: str = "float32", *, mesh: Mesh,
                         cpu_shapes: str = "auto") -> tuple[Any, dict, Any]:
    """(config, base, adapter or None) of a checkpoint, restored into their shards over `mesh`;
    `adapter` names one inside it (CKPT/adapters/NAME) or is an adapter directory (a LoRA or
    PPO run's workdir/adapter). `cpu_shapes` is `model.cpu_shapes`, decided for the mesh's devices."""
    from llava_jax.models.weights import load_adapter, load_adapter_dir, load_checkpoint

    config, base = load_checkpoint(ckpt, dtype=dtype, mesh=mesh)
    config = config.with_runtime(dtype=dtype, cpu_shapes=cpu_shapes_on(cpu_shapes, mesh.devices.flat[0].platform))
    if not adapter:
        return config, base, None
    if os.path.isdir(adapter) and not os.path.isdir(os.path.join(ckpt, "adapters", adapter)):
        return config, base, load_adapter_dir(adapter, base, mesh=mesh, config=config)[0]
    return config, base, load_adapter(ckpt, adapter, mesh=mesh)[0]
