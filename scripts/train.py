#!/usr/bin/env python
"""One driver for every stage:

  python scripts/train.py --config configs/tiny_sft.py [--config.train.batch_size=32 ...]

The stage (sft, rm, ppo) is a config field; configs named in `requires` run first when
their results are missing. Multi-host: TPU pod slices are detected by
`jax.distributed.initialize()` (set LLAVA_JAX_DISTRIBUTED=1 or pass --coordinator); GPU
clusters pass --coordinator HOST:PORT --num_processes N --process_id I.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# transformers serves only tokenizers here; without torch installed (the main command's
# install) it would advise at import that "PyTorch was not found", which does not apply.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("coordinator", None, "jax.distributed coordinator address HOST:PORT")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint phase at INFO
    import jax

    from llava_jax.platforms import skip_absent_tpu

    skip_absent_tpu()  # before any backend starts: no libtpu probe (and its stderr trace) without a TPU

    if FLAGS.coordinator:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif os.environ.get("LLAVA_JAX_DISTRIBUTED"):
        jax.distributed.initialize()
    from llava_jax.settings import RunSettings
    from llava_jax.stages import run_stage

    if FLAGS.config is None:
        sys.exit("--config is required, e.g. --config configs/tiny_sft.py")
    try:
        run_stage(RunSettings.from_config(FLAGS.config), overrides=given_overrides(sys.argv[1:]))
    except ValueError as e:
        sys.exit(f"error: {e}")


def given_overrides(argv: list[str]) -> list[str]:
    """The --config.a.b=value arguments, as given."""
    return [a for a in argv if a.startswith("--config.")]


def check_overrides(argv: list[str]) -> None:
    """Exits with one line naming a mistyped --config.a.b override and the closest fields
    (ml_collections would end in three chained tracebacks)."""
    import re

    from llava_jax.settings import unknown_field

    for arg in argv:
        m = re.match(r"--config\.([\w.]+)(=|$)", arg)
        problem = m and unknown_field(m.group(1))
        if problem:
            sys.exit(f"error: {problem}")


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    app.run(main)
