#!/usr/bin/env python
"""Logit / hidden-state errors of our models against HF PyTorch on tiny random float32 weights.

  python tests/parity_report.py        (needs the test extra: torch, peft)

Prints max |ours - HF| / max |HF| over non-pad tokens for LLaMA (MHA and GQA, left-padded),
CLIP (every layer, 224- and 336-style geometry), LLaVA (both projectors, a batch mixing
image and text-only items), LoRA vs HF + PEFT, and bfloat16 compute vs float32: the
figures the parity tests bound (1e-5, 1e-5, 1e-4, 1e-5 and 2e-2).
"""
from __future__ import annotations

import os
import sys
import tempfile

# A report beside the tests it shares helpers with (tiny_hf, test_models), not a script.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tiny_hf  # noqa: E402
from llava_jax.models import lora  # noqa: E402
from llava_jax.convert import load_hf  # noqa: E402
from llava_jax.convert.peft import read_peft_adapter  # noqa: E402
from llava_jax.models.clip import ClipVision  # noqa: E402
from llava_jax.models.llama import Llama  # noqa: E402
from test_models import _hf_llava_logits, _llama_logits, _llava_batch  # noqa: E402


def main() -> None:
    rows = []
    d = tempfile.mkdtemp()
    tiny_hf.save_clip(os.path.join(d, "clip"))
    for name, kv in (("MHA", 4), ("GQA", 2)):
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(tiny_hf.llama_config(kv)).eval()
        tiny_hf._randomise_norms(hf)
        hf.save_pretrained(os.path.join(d, name))
        cfg, p = load_hf(os.path.join(d, name), vision_tower=os.path.join(d, "clip"))
        ids, mask = tiny_hf.left_padded_batch(40, [0, 5, 17])
        ours = np.asarray(Llama(cfg.text).apply({"params": p["llm"]}, ids, mask))
        rows.append((f"LLaMA {name}, left-padded", tiny_hf.rel_error(ours, _llama_logits(hf, ids, mask), mask), 1e-5))
    for size in (28, 42):
        hf = tiny_hf.save_clip(os.path.join(d, f"c{size}"), image_size=size)
        cfg, p = load_hf(os.path.join(d, "GQA"), vision_tower=os.path.join(d, f"c{size}"))
        px = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
        with torch.no_grad():
            ref = hf(torch.tensor(px).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
        out = ClipVision(cfg.vision).apply({"params": p["vision"]}, px, all_hidden_states=True)["hidden_states"]
        err = max(tiny_hf.rel_error(np.asarray(out[i]), r.numpy()) for i, r in enumerate(ref))
        rows.append((f"CLIP every layer, {cfg.vision.num_patches} patches", err, 1e-5))
    for proj in ("mlp2x_gelu", "linear"):
        hf = tiny_hf.llava_model(proj, image_size=42)
        hf.save_pretrained(os.path.join(d, proj))
        cfg, p = load_hf(os.path.join(d, proj))
        ids, mask, px, has_image = _llava_batch(cfg)
        ours = np.asarray(lora.forward(cfg, p, None, ids, px, mask))
        rows.append((f"LLaVA {proj}, mixed batch", tiny_hf.rel_error(ours, _hf_llava_logits(hf, ids, mask, px, has_image),
                                                                     mask), 1e-4))
        bf = cfg.with_runtime(dtype="bfloat16", param_dtype="bfloat16")
        bp = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), p)
        rows.append((f"LLaVA {proj}, bfloat16 vs float32",
                     tiny_hf.rel_error(np.asarray(lora.forward(bf, bp, None, ids, px, mask)), ours, mask), 2e-2))
        if proj == "mlp2x_gelu":
            pm = peft.get_peft_model(tiny_hf.llava_model(proj, image_size=42), peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|"
                                                  r"up_proj|down_proj)")).eval()
            torch.manual_seed(1)
            with torch.no_grad():
                for n, t in pm.named_parameters():
                    if "lora_" in n:
                        t.copy_(0.1 * torch.randn_like(t))
            pm.save_pretrained(os.path.join(d, "peft"))
            adapter = read_peft_adapter(os.path.join(d, "peft"), p)
            ref = _hf_llava_logits(pm, ids, mask, px, has_image)
            rows.append(("LoRA vs HF + PEFT", tiny_hf.rel_error(np.asarray(lora.forward(cfg, p, adapter, ids, px, mask)),
                                                                 ref, mask), 1e-5))
    print(f"{'check':<40}{'rel error':>12}{'bound':>10}")
    for name, err, bound in rows:
        print(f"{name:<40}{err:>12.2e}{bound:>10.0e}{'' if err <= bound else '  EXCEEDED'}")


if __name__ == "__main__":
    main()
