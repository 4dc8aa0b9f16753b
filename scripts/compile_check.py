#!/usr/bin/env python
"""Memory per device and compile time of every step of a stage, before hardware:

  python scripts/compile_check.py --config configs/ppo_13b.py --mesh data=1,fsdp=8,tensor=1
  python scripts/compile_check.py --config configs/sft_13b.py --mesh fsdp=8 --device-memory 16GiB
  python scripts/compile_check.py --config configs/sft_13b.py --mesh fsdp=8 --layers 2   # depth vs compile time
  python scripts/compile_check.py --config configs/rm_13b.py --mesh fsdp=8 --config.model.remat=none

No weights are read or created: params are `jax.eval_shape` trees, arguments are sharded
ShapeDtypeStructs, each step is lowered and compiled for the mesh, and the table shows
per-device params, optimiser state, batch + outputs, temporaries (activations) and their
total against named device memories. The mesh is made of forced host CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N is set here before jax starts), so
the byte counts are XLA:CPU's buffer assignment for the real shardings.

The model comes from `model.init`/config.json when that checkpoint exists, else from the
7b / 13b preset its path names (or --model). `--config.a.b=value` overrides any config
field, as in scripts/train.py.

TPU topologies (MaxText-style ahead-of-time compile for e.g. v5e-8 from a CPU host) need
libtpu, which is not installed here, so that is not offered: the figures are from CPU.
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
    p.add_argument("--mesh", default=None, help="data=D,fsdp=F,tensor=T (default: the config's mesh on --devices)")
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


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={forced_devices(args)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from llava_jax import compile_check as cc, sharding  # imports jax: after XLA_FLAGS
    from llava_jax.trainer import load_config_file

    try:
        cfg = load_config_file(args.config)
        cc.apply_overrides(cfg, overrides)
        shape = cc.parse_mesh(args.mesh) if args.mesh else (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        mesh = sharding.make_mesh(shape)
        memories = ({args.device_memory: cc.parse_bytes(args.device_memory)} if args.device_memory
                    else cc.DEVICE_MEMORY)
        steps = tuple(s.strip() for s in args.steps.split(",")) if args.steps else None
        print(f"{args.config}: stage {cfg.stage}, mesh {dict(mesh.shape)} ({mesh.size} forced CPU devices)")
        reports = cc.check(cfg, mesh, model=args.model, reward_model=args.reward_model, layers=args.layers,
                           rollout_batch=args.rollout_batch, steps=steps)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(cc.format_table(reports, memories))


if __name__ == "__main__":
    main()
