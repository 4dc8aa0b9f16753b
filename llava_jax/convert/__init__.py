"""HF PyTorch <-> llava_jax conversion: `load_hf` (HF directory -> config, params) and
`export_hf` (-> llava-hf directory); PEFT adapters in `peft.py`. Our own checkpoint format
lives in `llava_jax/models/weights.py`. `ConversionError` is the one error these raise for bad
input."""
from llava_jax.convert.hf_export import export_hf
from llava_jax.convert.hf_import import load_hf
from llava_jax.files import ConversionError

__all__ = ["ConversionError", "export_hf", "load_hf"]
