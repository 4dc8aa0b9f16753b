"""Every script and tool answers --help from its own parser (its module imports and its
options parse, in this process), and the toy evaluation's table has its layout. The fast
tier's touch of the modules whose real runs are the full suite's slow tests."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The runnable ones (a main); the libraries beside them (bench_ppo_world, torch_ppo_reference) are
# imported by the benchmarks and their tests.
ENTRIES = sorted(f"{folder}.{name[:-3]}" for folder in ("scripts", "tools")
                 for name in os.listdir(os.path.join(ROOT, folder))
                 if name.endswith(".py") and "\ndef main(" in open(os.path.join(ROOT, folder, name)).read())


@pytest.mark.parametrize("module", ENTRIES)
def test_help_exits_cleanly_and_names_the_script(module, monkeypatch, capsys):
    import importlib
    import inspect

    entry = importlib.import_module(module)
    script = os.path.join(ROOT, *module.split(".")) + ".py"
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        entry.main(["--help"]) if inspect.signature(entry.main).parameters else entry.main()
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage:") and os.path.basename(script) in out.splitlines()[0]


def test_the_torch_reference_is_a_library_with_the_hyper_parameters_bench_ppo_reads():
    from scripts.torch_ppo_reference import TorchPPO, TorchPPOHyper

    assert callable(TorchPPOHyper.from_config) and callable(TorchPPO)


def test_the_toy_table_has_one_row_per_model_and_the_question_count():
    from llava_jax.eval import toy_eval

    scores = {key: 0.5 for key, _, _ in toy_eval.COLUMNS} | {"n": 256}
    table = toy_eval.format_table({"sft": scores, "ppo": {**scores, toy_eval.COLUMNS[0][0]: 0.25}}).splitlines()
    assert len(table) == 5 and table[0].startswith("| model |") and table[2].startswith("| sft |")
    assert table[2] != table[3] and "256 describe questions" in table[4]
