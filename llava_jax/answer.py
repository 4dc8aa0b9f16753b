"""Batched answers to an eval question file: the one generation loop (and model loading)
behind `scripts/generate.py`, `scripts/eval_toy.py` and the toy-world evaluation
(`llava_jax/toy_eval.py`)."""
from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import numpy as np

from llava_jax.data import EvalDataset, Loader
from llava_jax.data.eval_data import EvalQuestion
from llava_jax.sampling import SamplingConfig, generate_fn


def answer_batches(config: Any, base: dict, adapter: Any, tokenizer: Any, dataset: EvalDataset,
                   sampling: SamplingConfig, batch_size: int, seed: int = 0
                   ) -> Iterator[list[tuple[EvalQuestion, str, int]]]:
    """Per loader batch: (question, answer text, answer tokens) of its valid rows, in file order.
    `adapter` None answers with the base model. Prompts are left padded to the loader's
    bucket lengths (a few compiled shapes)."""
    run = generate_fn(config, sampling)
    loader = Loader(dataset, batch_size, shuffle=False, num_epochs=1, drop_remainder=False, pad_side="left",
                    process_index=0, process_count=1)
    rng = jax.random.PRNGKey(seed)
    try:
        for batch in loader:
            rng, key = jax.random.split(rng)
            out = run(base, adapter, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], key)
            tokens, mask = np.asarray(out["tokens"]), np.asarray(out["mask"]).astype(bool)
            rows = []
            for row, (valid, meta) in enumerate(zip(batch["valid"], batch["meta"])):
                if valid and meta is not None:
                    ids = [int(t) for t in tokens[row][mask[row]] if t != sampling.eos_id]
                    rows.append((meta["question"], tokenizer.decode(ids).strip(), len(ids)))
            yield rows
    finally:
        loader.close()


def load_answering_model(ckpt: str, adapter: str | None = None, dtype: str = "float32") -> tuple[Any, dict, Any]:
    """(config, base, adapter or None) of a checkpoint; `adapter` names one inside it
    (CKPT/adapters/NAME) or is an adapter directory (a LoRA or PPO run's workdir/adapter)."""
    from llava_jax.model_ckpt import load_adapter, load_adapter_dir, load_checkpoint

    config, base = load_checkpoint(ckpt, dtype=dtype)
    config = config.with_runtime(dtype=dtype)
    if not adapter:
        return config, base, None
    if os.path.isdir(adapter) and not os.path.isdir(os.path.join(ckpt, "adapters", adapter)):
        return config, base, load_adapter_dir(adapter, base)[0]
    return config, base, load_adapter(ckpt, adapter)[0]
