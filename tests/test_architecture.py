"""The package's shape, read from the source: no import circle between modules, each folder
imports only the layers below it (a function-level import counts too), nothing imports the
scripts or the tests, and the stable API's old module path still imports, with a warning."""
import ast
import os
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llava_jax")

# What each folder (or top-level module) may import from llava_jax: the layers below it.
# Top-level modules without an entry (files, platforms, settings_read) import no other part.
ALLOWED = {
    "settings": {"settings_read", "models", "sharding"},  # models, sharding: inside functions only
    "sharding": {"models"},
    "models": {"files", "sharding"},
    "data": set(),
    "convert": {"files", "models"},
    "generate": {"data", "models", "settings", "sharding"},
    "eval": {"data", "generate"},
    "train": {"data", "models", "settings", "sharding"},
    "rl": {"convert", "data", "eval", "generate", "models", "settings", "sharding", "train"},
    "aot": {"data", "models", "rl", "settings", "sharding", "train"},
    "stages": {"rl", "settings", "train"},
    "cli": {"platforms", "settings", "stages"},
    "model_ckpt": {"models"},  # the deprecated alias
}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = "llava_jax." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def _imports() -> dict[str, set[str]]:
    """module -> the llava_jax modules it imports (submodules named in a `from` count as theirs)."""
    modules = _modules()
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("llava_jax",
                                                                                                   "scripts", "tests"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                if len(subs) < len(node.names):
                    edges[module].add(node.module)
                edges[module] |= subs
            elif isinstance(node, ast.Import):
                edges[module] |= {a.name for a in node.names if a.name.split(".")[0] in ("llava_jax", "scripts")}
        edges[module].discard(module)
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llava_jax"


def test_no_module_imports_upwards_or_outside_the_package():
    edges = _imports()
    wrong = sorted(f"{a} imports {b}" for a, bs in edges.items() for b in bs
                   if not b.startswith("llava_jax") or (_layer(a) != _layer(b) and _layer(b) != "llava_jax"
                                                        and _layer(b) not in ALLOWED.get(_layer(a), set())))
    assert not wrong, "imports against the layering (tests/test_architecture.py ALLOWED):\n" + "\n".join(wrong)


def test_no_import_circle_between_modules():
    edges = {a: {b for b in bs if b in _modules()} for a, bs in _imports().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(other):] + [module, other]))
            if other not in state:
                visit(other, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_old_checkpoint_module_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("llava_jax.model_ckpt", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("llava_jax.model_ckpt")
    from llava_jax.models import weights

    assert old.load_checkpoint is weights.load_checkpoint and old.save_checkpoint is weights.save_checkpoint
    assert any(issubclass(w.category, DeprecationWarning) and "llava_jax.models.weights" in str(w.message)
               for w in caught)
