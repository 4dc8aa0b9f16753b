"""constraints.txt is the tested environment: every pin installed at exactly its version,
every declared dependency (and everything they pull in) pinned, each pin allowed by pyproject."""
from __future__ import annotations

import os
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.freeze_constraints import CONSTRAINTS, closure, declared_requirements


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    with open(CONSTRAINTS) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", "-")):
                continue
            req = Requirement(line)
            (spec,) = req.specifier  # one exact pin per line, no ranges
            assert spec.operator == "==" and not req.marker and not req.extras, line
            name = canonicalize_name(req.name)
            assert name not in pins, f"{req.name} pinned twice"
            pins[name] = Version(spec.version)
    return pins


def _installed(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def test_installed_versions_match_the_pins():
    drift = {}
    for name, pinned in _pins().items():
        installed = _installed(name)
        if installed is None:
            continue  # not for this platform (a marker left it out of the install)
        if installed != pinned:  # exact, local label included: 2.13.0 is not 2.13.0+cpu
            drift[name] = f"installed {installed}, pinned {pinned}"
    assert not drift, f"environment drifted from constraints.txt: {drift}"


def test_declared_dependencies_are_pinned_within_their_ranges():
    pins = _pins()
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject) is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the pin {pins[name]}"
    assert "llava-jax" not in pins


def test_whole_installed_closure_is_pinned():
    # a dependency's new dependency (after an upgrade) must be pinned too, and nothing stale stays
    required = set(closure(declared_requirements()))
    pinned = set(_pins())
    missing = sorted(required - pinned)
    assert not missing, f"required but not pinned: {missing}; run python tools/freeze_constraints.py"
    stale = sorted(name for name in pinned - required if _installed(name))  # uninstalled: another platform's
    assert not stale, f"pinned but no longer required: {stale}; run python tools/freeze_constraints.py"


def test_the_install_commands_use_the_constraints():
    repo = os.path.dirname(CONSTRAINTS)
    readme = open(os.path.join(repo, "README.md")).read()
    ci = open(os.path.join(repo, ".ci", "run")).read()
    assert "python -m pip install -c constraints.txt -e . &&" in readme
    test_command = "python -m pip install -q -c constraints.txt -e '.[test]' && python -m pytest -q"
    assert test_command in readme and test_command in ci
