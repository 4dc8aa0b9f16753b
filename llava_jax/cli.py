"""The training driver: one command for every stage, from any directory.

  llava-jax-train --config configs/tiny_sft.py [--config.train.batch_size=32 ...]
  python -m llava_jax.cli --config ...    (the same, without the console script)
  python scripts/train.py --config ...    (the same, from a checkout without an install)

`llava-jax-train` is the console script `pip install -e .` makes (pyproject.toml
[project.scripts]); `python -m llava_jax.cli` runs it with the interpreter named, wherever
llava_jax is importable. The stage (sft, rm, ppo) is a config field; the configs named in
`requires` run first when their results are missing.

Paths, one rule applied here, once (`settings.load_settings`): a relative path written in a
config file resolves against that file's project root, the directory above the file's folder
(the repository for configs/*.py); a relative path given on the command line
(`--config.data.train=...`, `--config FILE` itself) against the current directory. Each path
field becomes absolute before validation, and the run prints the ones it resolved; a required
config's relative paths resolve against its own project root. An error about a missing path
names the field, what was written and the absolute path.

Multi-host: TPU pod slices are detected by `jax.distributed.initialize()` (set
LLAVA_JAX_DISTRIBUTED=1 or pass --coordinator); GPU clusters pass --coordinator HOST:PORT
--num_processes N --process_id I.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Args:
    """The driver's command line: the config file, its `--config.a.b=value` overrides as given,
    and the multi-host flags."""
    config: str | None
    overrides: tuple[str, ...] = ()
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def parse_args(argv: Sequence[str]) -> Args:
    """`argv` without the program's name. The overrides stay as given, for the settings' one
    parser (which names a mistyped field and the closest ones); argparse takes the rest."""
    overrides = tuple(a for a in argv if a.startswith("--config."))
    parser = argparse.ArgumentParser(description="Train one stage (sft, rm, ppo) of LLaVA-RLHF, after the "
                                     "stages its config requires.", allow_abbrev=False,
                                     epilog="Overrides: --config.a.b=value (e.g. --config.train.max_steps=3). "
                                     "Relative paths in the config file resolve against its project root, the "
                                     "directory above its folder; on the command line, against the current one.")
    parser.add_argument("--config", help="config file (configs/*.py)")
    parser.add_argument("--coordinator", help="jax.distributed coordinator address HOST:PORT")
    parser.add_argument("--num_processes", type=int, help="number of processes (with --coordinator)")
    parser.add_argument("--process_id", type=int, help="this process's index (with --coordinator)")
    ns = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    return Args(ns.config, overrides, ns.coordinator, ns.num_processes, ns.process_id)


def main(argv: Sequence[str] | None = None) -> None:
    """The entry of `llava-jax-train`, `python -m llava_jax.cli` and scripts/train.py:
    `argv` without the program's name (default: sys.argv[1:]). Exits with one line on a
    config error."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config is None:
        sys.exit("--config is required, e.g. --config configs/tiny_sft.py")
    # transformers serves only tokenizers here; without torch installed (the main command's
    # install) it would advise at import that "PyTorch was not found", which does not apply.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_logging()
    from llava_jax.settings import load_settings

    try:
        # Read before any backend starts: a config error costs no JAX start (nor libtpu's probe).
        settings, resolved = load_settings(args.config, args.overrides)
        _start_jax(args)
        run(settings, resolved, args.overrides)
    except ValueError as e:
        sys.exit(f"error: {e}")


def train(config: str, overrides: Sequence[str] = ()) -> dict:
    """`main` in this process, its JAX already started: the stage of `config` after its
    requirements, paths resolved and printed; the last step's metrics."""
    from llava_jax.settings import load_settings

    return run(*load_settings(config, overrides), overrides)


def run(settings: Any, resolved: Sequence[Any], overrides: Sequence[str] = ()) -> dict:
    """Prints the paths the entry resolved (process 0), then runs the stage."""
    import jax

    from llava_jax.settings import describe_resolved
    from llava_jax.stages import run_stage

    if resolved and jax.process_index() == 0:
        print(describe_resolved(list(resolved)))
    return run_stage(settings, overrides=overrides)


def _quiet_logging() -> None:
    """absl logging as `absl.app.run` sets it up (its flags marked parsed at their defaults, so
    no "logging before flag parsing" notice), at WARNING: orbax logs every checkpoint phase at INFO."""
    from absl import flags, logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)


def _start_jax(args: Args) -> None:
    """JAX's backends for this host, and the process group of a multi-host run."""
    import jax

    from llava_jax.platforms import skip_absent_tpu

    skip_absent_tpu()  # before any backend starts: no libtpu probe (and its stderr trace) without a TPU
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("LLAVA_JAX_DISTRIBUTED"):
        jax.distributed.initialize()


if __name__ == "__main__":
    main()
