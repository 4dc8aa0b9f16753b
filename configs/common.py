"""Defaults shared by every config: `base_config()` is the settings tree's defaults
(llava_jax/settings.py, where each field has its type and one-line doc) as a ConfigDict. Stage
configs (`sft_7b.py`, `rm_13b.py`, `tiny_sft.py`, ...) start from it and set what differs.
Override any field from the command line: `--config.optim.learning_rate=1e-5`; list fields
(`requires`, `train.lora_targets`) take a comma-separated string. Every field with its default,
stages and doc: `python -c "from llava_jax.settings import docs, RunSettings; print(*docs(RunSettings), sep='\\n')"`."""
import ml_collections

from llava_jax import settings


def base_config() -> ml_collections.ConfigDict:
    return settings.base_config()
