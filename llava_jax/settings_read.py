"""How the settings tree (llava_jax/settings.py) is declared, read and checked, knowing no
section of it: the lowest layer of llava_jax (it imports nothing of the package at import time).

* `setting(default, doc, stages=..., unread=...)` declares a field: its default, its one-line
  doc and the stages that read it (default: its section's `STAGES`); `unread` gives the reason
  a stage refuses it, where a plain "does not read" would not say enough.
* `Section` is the base of every frozen section: constructing one converts and checks each field
  against its type hint, once (a `Literal` option must be one of its values, a `tuple[str, ...]`
  comes from a comma string or a list, an int stands for a float), so `from_config`, `replace`
  and a direct call all produce checked values.
* `read` builds a tree from a mapping of mappings (a ConfigDict), refusing an unknown field by
  name with the closest known ones; `refuse_unread` refuses a field the run's stage never reads
  when set away from its default; `as_config_dict` turns a tree's defaults into the ConfigDict
  that config files and `--config.a.b=value` override (configs/common.py's `base_config`).
* `load_config_file` and `apply_overrides` (the one `--config.a.b=value` parser besides
  ml_collections' own, which scripts/train.py uses) serve the entries.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import numbers
import os
import re
import typing
from typing import Any, Callable, Iterator, Literal

ALL_STAGES = ("sft", "rm", "ppo")


def setting(default: Any, doc: str, *, stages: tuple[str, ...] | None = None,
            unread: dict[str, str] | None = None) -> Any:
    """A field of a settings section (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "stages": stages, "unread": unread or {}})


def section(cls: type, doc: str) -> Any:
    """A field holding a whole section, built from its defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "stages": None, "unread": {}})


class Section:
    """Base of a frozen settings dataclass: `PATH` names it in errors ("config.ppo"), `STAGES`
    are the stages that read its fields unless a field names its own."""

    PATH = "config"
    STAGES = ALL_STAGES

    def __post_init__(self) -> None:
        for f, kind in hints(type(self)):
            value = getattr(self, f.name)
            converted = convert(kind, value, f"{self.PATH}.{f.name}")
            if converted is not value:
                object.__setattr__(self, f.name, converted)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields replaced (converted and checked as when read);
        `replace(train={"max_steps": 3})` edits inside a section."""
        out = {}
        for name, value in changes.items():
            current = getattr(self, name)
            out[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **out)


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved type hint) of each field of a section class."""
    resolved = typing.get_type_hints(cls)
    return tuple((f, resolved[f.name]) for f in dataclasses.fields(cls))


def is_section(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Section)


def options(kind: Any) -> tuple | None:
    """The values of a `Literal` type, else None."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def convert(kind: Any, value: Any, where: str) -> Any:
    """`value` as a `kind` (the field's type hint), or a one-line ValueError naming `where`."""
    choices = options(kind)
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{where}={value!r}: expected one of {choices}")
        return value
    if is_section(kind):
        if not isinstance(value, kind):
            raise ValueError(f"{where}: expected a {kind.__name__}, got {type(value).__name__}")
        return value
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):  # the command line's form: "a,b"
            value = [part.strip() for part in value.split(",")]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}={value!r}: expected a comma-separated string or a list of strings")
        out = tuple(v.strip() for v in value if v.strip())
        return value if out == value else out
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected True or False")
        return value
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"{where}={value!r}: expected a number ({kind.__name__})")
    if kind is int:
        if isinstance(value, numbers.Integral):
            return value if type(value) is int else int(value)
        if float(value).is_integer():
            return int(value)
        raise ValueError(f"{where}={value!r}: expected an integer")
    if kind is float:
        return value if type(value) is float else float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r}: expected a string")
        return value
    raise TypeError(f"{where}: settings fields of type {kind!r} are not supported")


def read(cls: type, node: Any, where: str = "config") -> Any:
    """The `cls` tree of a mapping of mappings; a field `node` leaves out keeps its default."""
    if not hasattr(node, "keys"):
        raise ValueError(f"{where}={node!r}: expected a section (a mapping of its fields)")
    fields = dict(hints(cls))
    by_name = {f.name: (f, kind) for f, kind in fields.items()}
    for key in node.keys():
        if key not in by_name:
            close = difflib.get_close_matches(key, sorted(by_name), n=3, cutoff=0.5)
            raise ValueError(f"{where}.{key}: no such setting (llava_jax reads no such field)"
                             + (f"; closest: {', '.join(f'{where}.{c}' for c in close)}" if close else ""))
    values = {}
    for name in node.keys():
        kind = by_name[name][1]
        values[name] = read(kind, node[name], f"{where}.{name}") if is_section(kind) else node[name]
    return cls(**values)


def leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted name, field, value, the section class's default) of every leaf field of a tree."""
    defaults = type(tree)()
    for f, kind in hints(type(tree)):
        if is_section(kind):
            yield from leaves(getattr(tree, f.name), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, getattr(tree, f.name), getattr(defaults, f.name)


def reading_stages(cls: type, dotted: str) -> tuple[str, ...]:
    """The stages that read the field `dotted` of the tree class `cls`."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        cls = dict((f.name, kind) for f, kind in hints(cls))[name]
    f = next(f for f, _ in hints(cls) if f.name == leaf)
    return f.metadata.get("stages") or cls.STAGES


def refuse_unread(tree: Any, stage: str) -> None:
    """A one-line ValueError for the first field that `stage` does not read, set away from its default."""
    for name, f, value, default in leaves(tree):
        stages = reading_stages(type(tree), name)
        if stage in stages or value == default:
            continue
        why = f.metadata["unread"].get(stage)
        unread = f"the {stage} stage does not read this field (read by {', '.join(stages)} only)"
        said = f"{why}; {unread}" if why else f"{unread}; drop it or leave it at its default {default!r}"
        raise ValueError(f"{tree.PATH}.{name}={value!r}: {said}")


def field_names(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a tree class."""
    names = []
    for f, kind in hints(cls):
        names += field_names(kind, f"{prefix}{f.name}.") if is_section(kind) else [prefix + f.name]
    return names


def unknown_field(cls: type, dotted: str) -> str | None:
    """None when `dotted` names a leaf field of `cls`; else a one-line error with the closest ones."""
    names = field_names(cls)
    if dotted in names:
        return None
    close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.5)
    return f"--config.{dotted}: no such config field" + (f"; closest: {', '.join(close)}" if close else "")


def config_values(tree: Any) -> dict[str, Any]:
    """The nested dict of a tree's values in their config-file form (tuples as comma strings)."""
    out: dict[str, Any] = {}
    for f, kind in hints(type(tree)):
        value = getattr(tree, f.name)
        out[f.name] = (config_values(value) if is_section(kind)
                       else ",".join(value) if isinstance(value, tuple) else value)
    return out


def as_config_dict(tree: Any) -> Any:
    """A ConfigDict of `tree`'s values, typed as the command line overrides them."""
    import ml_collections

    return ml_collections.ConfigDict(config_values(tree))


def docs(cls: type, prefix: str = "") -> list[tuple[str, str, Any, tuple[str, ...], str]]:
    """(dotted name, type, default, stages, doc) of every leaf field: the reference of the settings."""
    out = []
    defaults = cls()
    for f, kind in hints(cls):
        if is_section(kind):
            out += docs(kind, f"{prefix}{f.name}.")
            continue
        choices = options(kind)
        shown = " | ".join(choices) if choices else getattr(kind, "__name__", str(kind))
        out.append((prefix + f.name, shown, getattr(defaults, f.name), f.metadata.get("stages") or cls.STAGES,
                    f.metadata.get("doc", "")))
    return out


# ---------------------------------------------------------------------- config files

def load_config_file(path: str) -> Any:
    """`get_config()` of a config file (as `--config FILE` does, without overrides)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_llava_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(cfg: Any, items: list[str], problem_of: Callable[[str], str | None]) -> None:
    """`--config.a.b=value` items applied to a ConfigDict, as scripts/train.py accepts them
    (values parsed as Python literals, true/false too; ConfigDict's type checks reject a wrong
    type); `problem_of(dotted)` names an unknown field."""
    for item in items:
        m = re.fullmatch(r"--config\.([\w.]+)=(.*)", item)
        if not m:
            raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
        problem = problem_of(m.group(1))
        if problem:
            raise ValueError(problem)
        *parents, leaf = m.group(1).split(".")
        parent = cfg
        for key in parents:
            parent = parent[key]
        raw = m.group(2)
        try:
            value = ast.literal_eval({"true": "True", "false": "False"}.get(raw.lower(), raw))
        except (ValueError, SyntaxError):
            value = raw
        parent[leaf] = value
