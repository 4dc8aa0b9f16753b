"""Which loop runs a stage, after the stages it `requires`: `run_stage(settings)` is what the
driver (llava_jax/cli.py) calls. A required config runs first when its workdir has no exported
result (`tiny_ppo` needs a tiny SFT model and a tiny reward model); it is read as the driver
reads a config file (`load_settings`), so its relative paths resolve against its own project root.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax

from llava_jax.settings import RunSettings, describe_cpu_shapes, describe_resolved, load_settings, resolve_cpu_shapes


def exported_result(s: RunSettings) -> str | None:
    """The model or adapter a finished run of `s` left in its workdir, if any."""
    for name in ("model", "adapter"):
        path = os.path.join(s.workdir, name)
        if os.path.isdir(path):
            return path
    return None


def run_requirements(s: RunSettings, overrides: Sequence[str] = (), _seen: tuple[str, ...] = ()) -> None:
    """Runs each config in `s.requires` (its own requirements first) whose workdir has no
    exported result yet. Command-line overrides belong to the stage they were given for:
    a required stage runs from its own file, and says which overrides it does not take.
    (`s.requires` as the driver left it: absolute; a relative entry is found from the current directory.)"""
    for path in s.required_configs():
        if os.path.abspath(path) in _seen:
            raise ValueError(f"config.requires: cycle through {path}")
        required, resolved = load_settings(path)
        if exported_result(required) is not None:
            continue
        run_requirements(required, overrides, (*_seen, os.path.abspath(path)))
        if jax.process_index() == 0:
            print(f"requirement {path}: no result in {required.workdir} yet, running it first")
            if resolved:
                print(describe_resolved(resolved))
            if overrides:
                print(f"requirement {path} runs from its own file: it does not take the overrides "
                      f"{' '.join(overrides)} (run it on its own with them first if it should)")
        _run(required)
        if exported_result(required) is None:
            raise ValueError(f"requirement {path} finished without writing {required.workdir}/model or /adapter")


def resolve_for_devices(s: RunSettings) -> RunSettings:
    """`s` with the choices that depend on the run's devices made once, here, and printed:
    `model.cpu_shapes` (the model code reads the resulting config field, never the backend)."""
    platform = jax.devices()[0].platform
    resolved = resolve_cpu_shapes(s, platform)
    if jax.process_index() == 0:
        print(describe_cpu_shapes(s.model.cpu_shapes, resolved.model.cpu_shapes, platform))
    return resolved


def run_stage(s: RunSettings, overrides: Sequence[str] = ()) -> dict:
    """Trains the stage `s.stage` names (after its requirements); the last step's metrics."""
    run_requirements(s, overrides)
    return _run(s)


def _run(s: RunSettings) -> dict:
    s = resolve_for_devices(s)
    if s.stage == "ppo":
        from llava_jax.rl.loop import run_ppo

        return run_ppo(s)
    from llava_jax.train.loop import run_train

    return run_train(s)
