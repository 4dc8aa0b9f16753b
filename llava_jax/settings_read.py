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
* `load_config_file` (a config file's `get_config()`, its project root importable meanwhile) and
  `apply_overrides` (the one `--config.a.b=value` parser) serve the entries.
* Path fields (`setting(..., path=True)`) follow one rule, applied once at the entry by
  `resolve_paths`: a relative path written in a config file resolves against that file's
  project root (`project_root`: the directory above the file's folder), one given on the
  command line against the current directory; `path_problem` words an error about one (the
  field, what was written, the absolute path and what it was resolved against).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import numbers
import os
import re
import sys
import typing
from typing import Any, Callable, Collection, Iterator, Literal

ALL_STAGES = ("sft", "rm", "ppo")


def setting(default: Any, doc: str, *, stages: tuple[str, ...] | None = None,
            unread: dict[str, str] | None = None, path: bool = False, not_paths: tuple[str, ...] = ()) -> Any:
    """A field of a settings section (see the module docstring). `path`: its value (each item of
    a list) is a file or directory, resolved by the path rule, except "" and the words in `not_paths`."""
    return dataclasses.field(default=default, metadata={"doc": doc, "stages": stages, "unread": unread or {},
                                                        "path": path, "not_paths": not_paths})


def section(cls: type, doc: str) -> Any:
    """A field holding a whole section, built from its defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "stages": None, "unread": {},
                                                            "path": False, "not_paths": ()})


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

def project_root(config_file: str) -> str:
    """The directory above a config file's folder (`<root>/configs/x.py` -> `<root>`): what the
    file's relative paths resolve against and where its `import configs.<name>` is found."""
    return os.path.dirname(os.path.dirname(os.path.abspath(config_file)))


def load_config_file(path: str) -> Any:
    """`get_config()` of a config file (as `--config FILE` does, without overrides), from any
    current directory: the file's project root comes first on sys.path while it loads, so its
    `from configs.common import ...` finds the project's own configs/."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist" + _against_cwd(path))
    module_spec = importlib.util.spec_from_file_location(f"_llava_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    with _importable(project_root(path)):
        module_spec.loader.exec_module(module)
        return module.get_config()


def _is_package_of(module: Any, folder: str) -> bool:
    return any(os.path.realpath(p) == os.path.realpath(folder) for p in getattr(module, "__path__", ()))


@contextlib.contextmanager
def _importable(root: str) -> Iterator[None]:
    """`root` first on sys.path. A `configs` package imported earlier from another project is
    set aside meanwhile (and put back after), so one config never runs another project's."""
    ours = os.path.join(root, "configs")
    loaded = sys.modules.get("configs")
    stashed = {}
    if loaded is not None and os.path.isdir(ours) and not _is_package_of(loaded, ours):
        stashed = {n: sys.modules.pop(n) for n in list(sys.modules) if n == "configs" or n.startswith("configs.")}
    sys.path.insert(0, root)
    try:
        yield
    finally:
        if root in sys.path:  # (unless the config file took it off itself)
            sys.path.remove(root)  # the first occurrence: the one inserted above
        if stashed:
            for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
                del sys.modules[name]
            sys.modules.update(stashed)


_OVERRIDE = re.compile(r"--config\.([\w.]+)(?:=(.*))?", re.S)


def override_fields(items: Collection[str]) -> set[str]:
    """The dotted fields ("data.train") that `--config.a.b=value` items set."""
    return {m.group(1) for m in map(_OVERRIDE.fullmatch, items) if m}


def apply_overrides(cfg: Any, items: list[str], problem_of: Callable[[str], str | None]) -> None:
    """`--config.a.b=value` items applied to a ConfigDict, as the driver accepts them: a value is
    read as the field's current type (a string field takes the text as written, so
    `--config.workdir=123` is the string "123"; a bool takes true / false / 1 / 0, or nothing:
    `--config.log.tensorboard`); `problem_of(dotted)` names an unknown field."""
    for item in items:
        m = _OVERRIDE.fullmatch(item)
        if not m:
            raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
        problem = problem_of(m.group(1))
        if problem:
            raise ValueError(problem)
        *parents, leaf = m.group(1).split(".")
        parent = cfg
        for key in parents:
            parent = parent[key]
        parent[leaf] = _parse_value(item, parent[leaf], m.group(2))


def _parse_value(item: str, current: Any, raw: str | None) -> Any:
    """`raw` (None: the flag alone) as the type of the field's `current` value."""
    if isinstance(current, bool):
        words = {"true": True, "1": True, "false": False, "0": False}
        if raw is None or raw.lower() in words:
            return True if raw is None else words[raw.lower()]
        raise ValueError(f"{item}: expected true or false")
    if raw is None:
        raise ValueError(f"{item}: expected --config.a.b=value")
    if isinstance(current, str):
        return raw
    try:
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{item}: expected {'an integer' if isinstance(current, int) else 'a number'}") from None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


# ---------------------------------------------------------------------- path fields

@dataclasses.dataclass(frozen=True)
class Resolved:
    """A relative path field made absolute: `field` ("config.data.train") as `written`, the
    absolute `path`, and `against` (the directory it was resolved against, named)."""
    field: str
    written: str
    path: str
    against: str


# What the entry resolved, for the errors `path_problem` words later (validation runs in the loops,
# after the requirements have run, where only the absolute paths are left): (field, path) -> Resolved.
_RESOLVED: dict[tuple[str, str], Resolved] = {}


def resolve_paths(tree: Any, config_file: str | None, given: Collection[str], cwd: str) -> tuple[Any, list[Resolved]]:
    """`tree` with every relative path field made absolute by the rule: a path written in
    `config_file` resolves against its project root, a field in `given` (dotted names set on the
    command line) against `cwd`; "~" is the home directory. Also the list of what changed."""
    root = project_root(config_file) if config_file else cwd
    bases = {True: (cwd, f"the current directory {cwd}"),
             False: (root, f"{root}, the project root of {os.path.abspath(config_file)}" if config_file
                     else f"the current directory {cwd}")}
    done: list[Resolved] = []
    for name, f, value, _ in leaves(tree):
        if not f.metadata.get("path"):
            continue
        base, against = bases[name in given]
        where = f"{tree.PATH}.{name}"
        items = value if isinstance(value, tuple) else (value,)
        out = []
        for item in items:
            if item and item not in f.metadata["not_paths"] and not os.path.isabs(item):
                expanded = os.path.expanduser(item)
                path = os.path.normpath(os.path.join(base, expanded))
                done.append(Resolved(where, item, path, "the home directory" if expanded != item else against))
                item = path
            out.append(item)
        new = tuple(out) if isinstance(value, tuple) else out[0]
        if new != value:
            tree = _replace_leaf(tree, name, new)
    _RESOLVED.update({(r.field, r.path): r for r in done})
    return tree, done


def _replace_leaf(tree: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(tree, **{head: _replace_leaf(getattr(tree, head), rest, value) if rest else value})


def describe_resolved(done: list[Resolved]) -> str:
    """The block an entry prints: one line per path resolved, grouped by what it was resolved against."""
    lines = []
    for against in dict.fromkeys(r.against for r in done):
        lines.append(f"paths relative to {against}:")
        lines += [f"  {r.field}: {r.written} -> {r.path}" for r in done if r.against == against]
    return "\n".join(lines)


def path_problem(where: str, value: str, problem: str) -> str:
    """One error line about the path field `where` (e.g. "config.data.train") holding `value`:
    what was written, `problem` (" does not exist", ": expected ..."), then the absolute path and
    the directory it is relative to."""
    r = _RESOLVED.get((where, value))
    if r is not None:
        return f"{where}={r.written!r}{problem} ({r.path}, relative to {r.against})"
    return f"{where}={value!r}{problem}" + _against_cwd(value)


def _against_cwd(value: str) -> str:
    """How a relative path no entry resolved is found: against the current directory."""
    if not value or os.path.isabs(value):
        return ""
    return f" ({os.path.abspath(value)}, relative to the current directory {os.getcwd()})"
