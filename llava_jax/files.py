"""What every writer and reader of weight directories shares: the one-line error for bad
input files (`ConversionError`: HF directories and our checkpoints alike) and
`atomic_output_dir`, which makes an output directory appear only once it is complete (a
killed export leaves no half-written directory behind)."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


class ConversionError(Exception):
    """The single error type of the conversion tools; the message is one line."""


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a sibling temp dir that becomes ``path`` only if the body completes."""
    path = os.path.normpath(path)  # a trailing slash would put the temp dir inside path
    if os.path.lexists(path) and not overwrite:
        raise ConversionError(f"output {path} already exists (pass overwrite to replace it)")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConversionError(f"output {path} exists and is not a directory")
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a killed run that had our pid
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(path):
            if not overwrite:
                raise ConversionError(f"output {path} appeared while it was being written")
            # Move the old output aside only now that the new one is complete.
            old = f"{path}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
