#!/usr/bin/env python
"""Memory per device and compile time of every step of a stage, before hardware:

  python scripts/compile_check.py --config configs/sft_13b.py --target tpu-v5p-8      # the TPU compiler (.[tpu])
  python scripts/compile_check.py --config configs/ppo_13b.py --target tpu-v5e-16x2 --mesh data=2,fsdp=16
  python scripts/compile_check.py --config configs/sft_13b.py --target h100-8     # the CUDA compiler (.[gpu])
  python scripts/compile_check.py --config configs/ppo_13b.py --mesh data=1,fsdp=8,tensor=1   # forced CPU devices
  python scripts/compile_check.py --config configs/sft_13b.py --mesh fsdp=8 --device-memory 16GiB
  python scripts/compile_check.py --config configs/sft_13b.py --mesh fsdp=8 --layers 2   # depth vs compile time
  python scripts/compile_check.py --config configs/rm_13b.py --mesh fsdp=8 --config.model.remat=none

No weights are read or created: params are `jax.eval_shape` trees, arguments are sharded
ShapeDtypeStructs, each step is lowered and compiled for the mesh, and the table shows
per-device params, optimiser state, batch + outputs, temporaries (activations) and their
total against the device memory.

`--target h100-8 | h200-8 | h100-1 | h100-8x2` compiles for hosts of NVIDIA GPUs with XLA's
CUDA compiler (JAX's CUDA plugin: `pip install -c constraints.txt -e '.[gpu]'`; no GPU or
driver needed): the figures are the GPU buffer assignment, but the GPU compiler compiles a
program of any size, so "fits" compares the per-device total with the device memory (79.2 GiB
on an H100, 141 GiB on an H200; JAX preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION
says otherwise).

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
    p.add_argument("--target", default="cpu", help="cpu (forced host devices), a TPU slice: tpu-v5e-8, tpu-v4-16, "
                   "tpu-v5p-8, tpu-v6e-8, tpu-v5e-16x2 (2 slices), or GPU hosts: h100-8, h200-8, h100-1, "
                   "h100-8x2 (2 hosts)")
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


# GEMMs through cuBLAS, not Triton, for GPU targets: without a GPU the compiler cannot autotune,
# and its untuned Triton GEMM fusions fail to tile ("INTERNAL: Couldn't find output tile sizes
# that satisfy hlo: ... dot(...)", jax 0.10.2: CLIP's o_proj in sft_step and rm_step). A GPU autotunes
# between the two, so its fusions around the GEMMs (and their temporaries) may differ a little.
GPU_NO_TRITON_GEMM = "--xla_gpu_enable_triton_gemm=false"
TPU_ACCELERATOR_TYPES = {"v4": "v4-8", "v5e": "v5litepod-8", "v5p": "v5p-8", "v6e": "v6e-8"}


def target_columns(target, devices: int, device_kind: str) -> tuple[dict, dict, str]:
    """(memories, their column names, where it compiles) of a TPU or GPU target. The TPU
    compiler refuses a program that does not fit; the GPU compiler compiles any size, so its
    column is our per-device total against the device memory."""
    from llava_jax.aot import targets
    from llava_jax.aot.targets import GiB

    memory = target.memory_bytes
    if isinstance(target, targets.TpuTarget):
        return ({target.name: memory}, {target.name: f"fits {target.name} ({memory / GiB:g} GiB, the compiler)"},
                f"{devices} {device_kind} devices of {target.name} (the TPU compiler)")
    return ({target.name: memory}, {target.name: f"fits {target.name} ({memory / GiB:.1f} GiB, total vs device)"},
            f"{devices} {device_kind} devices of {target.name} (the CUDA compiler, sm_90, no GPU)")


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={forced_devices(args)}"
    if args.target.startswith(("h100", "h200")) and "xla_gpu_enable_triton_gemm" not in flags:
        flags += f" {GPU_NO_TRITON_GEMM}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from llava_jax import sharding
    from llava_jax.aot import compile_check as cc, report as compile_report, targets  # imports jax: after XLA_FLAGS
    from llava_jax.settings import RunSettings, load_config_file

    try:
        target = None if args.target == "cpu" else targets.parse_target(args.target)
        devices = None
        if isinstance(target, targets.TpuTarget):
            # Only silences libtpu's complaints about the (absent) TPU host; compiling needs neither.
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", TPU_ACCELERATOR_TYPES[target.generation.name])
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        if target is not None:
            devices = targets.target_devices(target)
        cfg = load_config_file(args.config)
        cc.apply_overrides(cfg, overrides)
        settings = RunSettings.from_config(cfg)
        shape = cc.parse_mesh(args.mesh) if args.mesh else settings.mesh.shape
        mesh = sharding.make_mesh(shape, devices)
        if target is not None:
            memories, names, where = target_columns(target, mesh.size, devices[0].device_kind)
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
        kind = target.generation.name if isinstance(target, targets.TpuTarget) else target.model.name
        print(f"\nper device, at {kind}'s peak ({target.peak_flops / 1e12:g} TFLOP/s bf16):")
        print(compile_report.format_costs(reports, target.peak_flops))
    too_big = isinstance(target, targets.GpuTarget) and not all(r.fits(target.memory_bytes) for r in reports)
    if any(r.error for r in reports) or too_big:  # a GPU step over its memory fails as a refused TPU step does
        sys.exit(1)


if __name__ == "__main__":
    main()
