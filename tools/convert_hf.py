#!/usr/bin/env python
"""HF PyTorch <-> llava_jax checkpoints.

  python tools/convert_hf.py import --hf DIR [--vision-tower CLIP_DIR] --out CKPT [--dtype bfloat16]
  python tools/convert_hf.py export --ckpt CKPT --out DIR [--tokenizer DIR] [--dtype float16]
  python tools/convert_hf.py verify --hf DIR --ckpt CKPT [--vision-tower CLIP_DIR]

`import` reads llava-hf (LlavaForConditionalGeneration), the original LLaVA layout
(LlavaLlamaForCausalLM + a CLIP directory) or a plain LlamaForCausalLM + a CLIP directory
(fresh projector). `export` writes the llava-hf layout. `verify` prints the logit error
against HF PyTorch. Bad input ends with one `error:` line, exit status 2, and no output.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("float32", "bfloat16", "float16")


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * scale)
    return int(upper)


def cmd_import(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from llava_jax.convert import load_hf, save_checkpoint

    config, params = load_hf(args.hf, dtype=jnp.dtype(args.dtype), vision_tower=args.vision_tower, seed=args.seed)
    save_checkpoint(args.out, config, params, overwrite=args.overwrite,
                    extra={"source": {"hf": os.path.abspath(args.hf), "vision_tower": args.vision_tower}})
    print(f"wrote {args.out}: projector={config.projector_type} layers={config.text.num_layers} "
          f"hidden={config.text.hidden_size} image={config.vision.image_size}px "
          f"({config.num_image_tokens} tokens) dtype={args.dtype}")


def cmd_export(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from llava_jax.convert import export_hf, load_checkpoint

    config, params = load_checkpoint(args.ckpt)
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    files = export_hf(config, params, args.out, tokenizer_dir=args.tokenizer, dtype=dtype,
                      max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    shards = [f for f in files if f.endswith(".safetensors")]
    print(f"wrote {args.out}: {len(shards)} safetensors file(s), LlavaForConditionalGeneration layout")


def cmd_verify(args: argparse.Namespace) -> None:
    from llava_jax.convert import load_checkpoint
    from llava_jax.convert.verify import verify

    config, params = load_checkpoint(args.ckpt)
    r = verify(args.hf, config, params, vision_dir=args.vision_tower, dtype=args.dtype, seed=args.seed)
    print(f"compared {r.compared_tokens} tokens: max |logit diff| {r.max_abs_error:.3e}, "
          f"max |logit| {r.max_abs_logit:.3e}, relative error {r.rel_error:.3e}")
    if args.tolerance is not None and r.rel_error > args.tolerance:
        print(f"error: relative error {r.rel_error:.3e} exceeds tolerance {args.tolerance:.1e}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="HF directory -> llava_jax checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--vision-tower", help="CLIP directory (original LLaVA layout or plain LLaMA)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype to store")
    p.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised projector")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("export", help="llava_jax checkpoint -> llava-hf directory")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="directory whose tokenizer files are copied along")
    p.add_argument("--dtype", choices=DTYPES, help="tensor dtype to write (default: as stored)")
    p.add_argument("--max-shard-size", type=_size, default=5 * 10**9, help="e.g. 5GB, 500MiB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("verify", help="logit error of a checkpoint against HF PyTorch")
    p.add_argument("--hf", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--vision-tower")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, help="exit 1 when the relative error is larger")
    p.set_defaults(fn=cmd_verify)

    args = parser.parse_args(argv)
    from llava_jax.convert import ConversionError

    try:
        args.fn(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
