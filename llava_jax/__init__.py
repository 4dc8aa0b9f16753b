"""llava_jax: LLaVA-RLHF (Factually Augmented RLHF for multimodal models) in JAX/Flax."""

__version__ = "0.1.0"
