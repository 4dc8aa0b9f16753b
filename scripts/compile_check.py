#!/usr/bin/env python
"""Memory per device and compile time of every step of a stage, before hardware:

  python scripts/compile_check.py --config configs/sft_13b.py --target tpu-v5p-8      # the TPU compiler (.[tpu])
  python scripts/compile_check.py --config configs/ppo_13b.py --target tpu-v5e-16x2 --mesh data=2,fsdp=16
  python scripts/compile_check.py --config configs/ppo_13b.py --mesh data=1,fsdp=8,tensor=1   # forced CPU devices
  python scripts/compile_check.py --config configs/sft_13b.py --mesh fsdp=8 --device-memory 16GiB
  python scripts/compile_check.py --config configs/sft_13b.py --mesh fsdp=8 --layers 2   # depth vs compile time
  python scripts/compile_check.py --config configs/rm_13b.py --mesh fsdp=8 --config.model.remat=none

No weights are read or created: params are `jax.eval_shape` trees, arguments are sharded
ShapeDtypeStructs, each step is lowered and compiled for the mesh, and the table shows
per-device params, optimiser state, batch + outputs, temporaries (activations) and their
total against the device memory.

`--target tpu-<v4|v5e|v5p|v6e>-<size>[x<slices>]` compiles for that TPU slice with the real
TPU compiler (libtpu: `pip install -e '.[tpu]'`; no TPU needed): the figures are what the
chips will allocate, "fits" is the compiler's own verdict (a step that does not fit is
refused with RESOURCE_EXHAUSTED), and a second table gives the compiled FLOPs and HBM bytes
per device against the model's FLOPs and the step-time lower bound at the chip's peak. v4
and v5p sizes count TensorCores (v4-8 = 4 chips), v5e and v6e chips. The default target,
`cpu`, compiles for forced host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count
is set here before jax starts): XLA:CPU's buffer assignment for the real shardings, an
estimate, not a promise.

The model comes from `model.init`/config.json when that checkpoint exists, else from the
7b / 13b preset its path names (or --model). `--config.a.b=value` overrides any config
field, as in scripts/train.py.
"""
import argparse
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (configs/*.py)")
    p.add_argument("--target", default="cpu", help="cpu (forced host devices) or a TPU slice: tpu-v5e-8, tpu-v4-16, "
                   "tpu-v5p-8, tpu-v6e-8, tpu-v5e-16x2 (2 slices)")
    p.add_argument("--mesh", default=None, help="data=D,fsdp=F,tensor=T (default: the config's mesh on the devices)")
    p.add_argument("--devices", type=int, default=8, help="forced CPU devices when --mesh is absent or has a -1")
    p.add_argument("--device-memory", default=None,
                   help="one column: fits this per-device memory (16GiB, 80GB); default: v4, v5e, v5p, h100")
    p.add_argument("--model", default=None, choices=("7b", "13b", "tiny"), help="model preset (default: inferred)")
    p.add_argument("--reward-model", default=None, choices=("7b", "13b", "tiny"),
                   help="ppo: preset of ppo.reward_base (default: inferred)")
    p.add_argument("--layers", type=int, default=None, help="override the LLM depth (compile time vs depth)")
    p.add_argument("--rollout-batch", type=int, default=0,
                   help="ppo: prompts per generate call (default: ppo.rollout_chunk, else rollout_batch)")
    p.add_argument("--steps", default=None, help="comma-separated subset, e.g. rollout_generate")
    return p.parse_known_args(argv)


def forced_devices(args: argparse.Namespace) -> int:
    """Devices to force before jax starts: the --mesh product, or --devices."""
    sizes = [int(v) for v in re.findall(r"-?\d+", args.mesh or "")]
    return math.prod(sizes) if sizes and -1 not in sizes else args.devices


TPU_ACCELERATOR_TYPES = {"v4": "v4-8", "v5e": "v5litepod-8", "v5p": "v5p-8", "v6e": "v6e-8"}


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={forced_devices(args)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from llava_jax import compile_check as cc, compile_report, sharding, targets  # imports jax: after XLA_FLAGS
    from llava_jax.settings import RunSettings, load_config_file

    try:
        target = None if args.target == "cpu" else targets.parse_target(args.target)
        devices = None
        if target is not None:
            # Only silences libtpu's complaints about the (absent) TPU host; compiling needs neither.
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", TPU_ACCELERATOR_TYPES[target.generation.name])
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
            devices = targets.target_devices(target)
        cfg = load_config_file(args.config)
        cc.apply_overrides(cfg, overrides)
        settings = RunSettings.from_config(cfg)
        shape = cc.parse_mesh(args.mesh) if args.mesh else settings.mesh.shape
        mesh = sharding.make_mesh(shape, devices)
        if target is not None:
            memories = {target.name: target.generation.hbm_bytes}
            names = {target.name: f"fits {target.name} ({target.generation.hbm_bytes / cc.GiB:g} GiB, the compiler)"}
            where = f"{mesh.size} {devices[0].device_kind} devices of {target.name} (the TPU compiler)"
        else:
            memories = ({args.device_memory: cc.parse_bytes(args.device_memory)} if args.device_memory
                        else cc.DEVICE_MEMORY)
            names = None
            where = f"{mesh.size} forced CPU devices: XLA:CPU's estimate, not an accelerator compiler's"
        steps = tuple(s.strip() for s in args.steps.split(",")) if args.steps else None
        print(f"{args.config}: stage {settings.stage}, mesh {dict(mesh.shape)} on {where}")
        reports = cc.check(settings, mesh, model=args.model, reward_model=args.reward_model, layers=args.layers,
                           rollout_batch=args.rollout_batch, steps=steps)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(compile_report.format_table(reports, memories, names))
    if target is not None:
        gen = target.generation
        print(f"\nper device, at {gen.name}'s peak ({gen.peak_flops / 1e12:g} TFLOP/s bf16):")
        print(compile_report.format_costs(reports, gen.peak_flops))
    if any(r.error for r in reports):
        sys.exit(1)


if __name__ == "__main__":
    main()
