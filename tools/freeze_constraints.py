#!/usr/bin/env python
"""Writes constraints.txt: the installed version of every package `pip install -e '.[test]'`
brings in, so the README's install commands reproduce a tested environment.

  python -m pip install -c constraints.txt -e '.[test]'   # the environment to lock (tests pass)
  python tools/freeze_constraints.py                       # rewrites constraints.txt from it
  python tools/freeze_constraints.py --check               # exit 1 if constraints.txt is stale

The set is the dependency closure of pyproject's `dependencies` and `test` extra (extras
followed, environment markers evaluated on this machine), read from the installed
distributions' metadata rather than `pip freeze`, so tools installed by hand beside them
(linters, notebooks) stay out; llava_jax itself and pip's build tools are not in it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10: tomli comes with pytest there
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(REPO, "constraints.txt")


def declared_requirements(pyproject: str = os.path.join(REPO, "pyproject.toml")) -> list[Requirement]:
    """pyproject's `dependencies` + the `test` extra: what the README's test install asks for."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def closure(requirements: list[Requirement]) -> dict[str, tuple[str, str]]:
    """canonical name -> (distribution name, installed version) of everything the
    requirements pull in here; a required distribution that is not installed raises."""
    pins: dict[str, tuple[str, str]] = {}
    expanded: set[tuple[str, str]] = set()  # (name, extra) whose requirements are queued
    todo = [req for req in requirements if req.marker is None or req.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {req.name} is required but not installed; "
                             "run: python -m pip install -e '.[test]'") from None
        pins[name] = (dist.metadata["Name"], dist.version)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            for spec in dist.requires or []:
                sub = Requirement(spec)
                # {"extra": ""}: the base requirements; an extra's own lines name it in their marker
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    pins.pop("llava-jax", None)
    return pins


def render(pins: dict[str, tuple[str, str]]) -> str:
    python = ".".join(map(str, sys.version_info[:2]))
    header = [
        "# Exact versions of everything `pip install -e '.[test]'` installs (pip -c constraints.txt).",
        f"# Frozen on {platform.system()} {platform.machine()}, CPython {python}. Refresh on purpose:",
        "#   python tools/freeze_constraints.py   (README, below the install commands).",
        "# torch is its CPU build (+cpu), which PyPI lacks: pip needs a local copy or",
        "#   --extra-index-url https://download.pytorch.org/whl/cpu",
    ]
    return "\n".join(header + [f"{dist}=={version}" for dist, version in
                               (pins[name] for name in sorted(pins))]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with constraints.txt, write nothing")
    args = parser.parse_args(argv)
    text = render(closure(declared_requirements()))
    if args.check:
        with open(CONSTRAINTS) as f:
            old = [line for line in f.read().splitlines() if not line.startswith("#")]
        new = [line for line in text.splitlines() if not line.startswith("#")]
        for line in sorted(set(old) ^ set(new)):
            print(("+ " if line in new else "- ") + line)
        return int(old != new)
    with open(CONSTRAINTS, "w") as f:
        f.write(text)
    pins = sum(not line.startswith("#") for line in text.splitlines())
    print(f"wrote {CONSTRAINTS}: {pins} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
