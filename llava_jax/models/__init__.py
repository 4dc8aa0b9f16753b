"""Flax models: CLIP vision tower (`clip`), LLaMA/Vicuna decoder (`llama`), LLaVA (`llava`)."""
