#!/usr/bin/env python
"""The training driver from a checkout, with or without an install:

  python scripts/train.py --config configs/tiny_sft.py [--config.train.batch_size=32 ...]

The same command as `llava-jax-train` (the console script of `pip install -e .`) and
`python -m llava_jax.cli`: the driver is llava_jax/cli.py, which describes its flags and how
it resolves relative paths.
"""
import os
import sys

# Python puts scripts/ on the path, not the checkout: without an install, llava_jax is found here.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
