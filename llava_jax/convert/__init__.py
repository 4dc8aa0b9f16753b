"""HF PyTorch <-> llava_jax conversion: `load_hf` (HF directory -> config, params),
`export_hf` (-> llava-hf directory), and our own checkpoint format (`save_checkpoint`,
`load_checkpoint`). `ConversionError` is the one error these raise for bad input."""
from llava_jax.convert.ckpt import (load_adapter, load_adapter_dir, load_checkpoint, load_config, save_adapter,
                                    save_checkpoint)
from llava_jax.convert.hf_export import export_hf
from llava_jax.convert.hf_files import ConversionError
from llava_jax.convert.hf_import import load_hf

__all__ = ["ConversionError", "export_hf", "load_adapter", "load_adapter_dir", "load_checkpoint", "load_config", "load_hf",
           "save_adapter", "save_checkpoint"]
