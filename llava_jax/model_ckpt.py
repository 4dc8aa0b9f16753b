"""Deprecated alias of `llava_jax.models.weights` (the stable API's old path), kept for one release."""
import warnings

from llava_jax.models.weights import *  # noqa: F401,F403
from llava_jax.models.weights import load_checkpoint, save_checkpoint  # noqa: F401

warnings.warn("llava_jax.model_ckpt moved to llava_jax.models.weights", DeprecationWarning, stacklevel=2)
