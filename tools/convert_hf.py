#!/usr/bin/env python
"""HF PyTorch <-> llava_jax checkpoints.

  python tools/convert_hf.py import --hf DIR [--vision-tower CLIP_DIR] --out CKPT [--dtype bfloat16]
  python tools/convert_hf.py import-adapter --peft DIR --ckpt CKPT --name NAME [--head-kind reward|value]
  python tools/convert_hf.py export --ckpt CKPT --out DIR [--format hf|peft|merged --adapter NAME]
  python tools/convert_hf.py verify --hf DIR --ckpt CKPT [--vision-tower CLIP_DIR]

`import-adapter` adds a PEFT LoRA adapter (llava-hf or original LLaVA keys) and its
reward/value head file to a checkpoint. `import` reads llava-hf (LlavaForConditionalGeneration), the original LLaVA layout
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

    from llava_jax.convert import load_hf
    from llava_jax.models.weights import save_checkpoint

    config, params = load_hf(args.hf, dtype=jnp.dtype(args.dtype), vision_tower=args.vision_tower, seed=args.seed)
    save_checkpoint(args.out, config, params, overwrite=args.overwrite,
                    extra={"source": {"hf": os.path.abspath(args.hf), "vision_tower": args.vision_tower}})
    print(f"wrote {args.out}: projector={config.projector_type} layers={config.text.num_layers} "
          f"hidden={config.text.hidden_size} image={config.vision.image_size}px "
          f"({config.num_image_tokens} tokens) dtype={args.dtype}")


def cmd_import_adapter(args: argparse.Namespace) -> None:
    from llava_jax.convert import ConversionError
    from llava_jax.models.weights import load_config, save_adapter, abstract_params
    from llava_jax.convert.peft import read_head, read_peft_adapter
    from llava_jax.models.heads import init_head

    config = load_config(args.ckpt)
    adapter = read_peft_adapter(args.peft, abstract_params(config))
    found = read_head(args.peft, config.text.hidden_size)
    head, kind = found if found else (None, None)
    if args.head_kind == "reward" and kind != "reward":
        raise ConversionError(f"--head-kind reward but no reward_head file next to {args.peft}")
    if args.head_kind == "value" and kind != "value":
        # LLaVA-RLHF's value model reuses the RM adapter with a NEW value head at zero.
        head, kind = init_head("value", config.text.hidden_size), "value"
    save_adapter(args.ckpt, args.name, adapter, head, kind, overwrite=args.overwrite,
                 extra={"source": {"peft": os.path.abspath(args.peft)}})
    lora = adapter.config
    print(f"added adapter {args.name!r} to {args.ckpt}: r={lora.rank} alpha={lora.alpha} "
          f"targets={','.join(lora.targets)}{' +projector' if lora.projector else ''} head={kind or 'none'}")


def cmd_export(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from llava_jax.convert import ConversionError, export_hf
    from llava_jax.models.weights import load_adapter, load_checkpoint

    if args.format != "hf" and not args.adapter:
        raise ConversionError(f"--format {args.format} needs --adapter NAME")
    if args.format == "peft":
        from llava_jax.convert.peft import write_peft_adapter

        adapter, head, kind = load_adapter(args.ckpt, args.adapter)
        write_peft_adapter(args.out, adapter, head, kind, overwrite=args.overwrite)
        print(f"wrote {args.out}: PEFT LoRA adapter {args.adapter!r} (r={adapter.config.rank})")
        return
    if args.format == "merged":  # merged in the shards of this host's devices, then brought home leaf by leaf
        from llava_jax.models.lora import merge_in_shards
        from llava_jax.sharding import host_mesh

        mesh = host_mesh()
        config, params = load_checkpoint(args.ckpt, mesh=mesh)
        params = merge_in_shards(params, load_adapter(args.ckpt, args.adapter, mesh=mesh)[0])
    else:  # host arrays: export_hf writes them leaf by leaf without a device
        config, params = load_checkpoint(args.ckpt)
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    files = export_hf(config, params, args.out, tokenizer_dir=args.tokenizer, dtype=dtype,
                      max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    shards = [f for f in files if f.endswith(".safetensors")]
    merged = f" with adapter {args.adapter!r} merged" if args.format == "merged" else ""
    print(f"wrote {args.out}: {len(shards)} safetensors file(s), LlavaForConditionalGeneration layout{merged}")


def cmd_verify(args: argparse.Namespace) -> None:
    from llava_jax.models.weights import load_checkpoint
    from llava_jax.convert.verify import verify
    from llava_jax.sharding import host_mesh

    config, params = load_checkpoint(args.ckpt, mesh=host_mesh())
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

    p = sub.add_parser("import-adapter", help="PEFT LoRA adapter (+ head) -> adapter NAME of a checkpoint")
    p.add_argument("--peft", required=True, help="PEFT adapter directory (adapter_config.json)")
    p.add_argument("--ckpt", required=True, help="converted base checkpoint to add the adapter to")
    p.add_argument("--name", required=True, help="e.g. policy, ref_policy, value, reward")
    p.add_argument("--head-kind", choices=("reward", "value"),
                   help="expected head; 'value' without a head file adds a zero value head")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_import_adapter)

    p = sub.add_parser("export", help="llava_jax checkpoint -> llava-hf directory or PEFT adapter")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=("hf", "peft", "merged"),
                   help="hf: the base; peft: adapter NAME; merged: the base with adapter NAME folded in")
    p.add_argument("--adapter", help="adapter name (for --format peft / merged)")
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
    from llava_jax.platforms import skip_absent_tpu

    skip_absent_tpu()  # before any backend starts

    try:
        args.fn(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
