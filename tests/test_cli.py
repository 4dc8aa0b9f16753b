"""The driver from any directory (llava_jax/cli.py; `llava-jax-train`, `python -m llava_jax.cli`,
scripts/train.py) and the one path rule: a relative path written in a config file resolves
against the file's project root (the directory above its folder), one given on the command line
against the current directory; both are absolute before validation, printed, and an error about
a missing one names the field, what was written and the absolute path."""
import os
import subprocess
import sys
import tomllib

import pytest

import configs.common  # noqa: F401 (this repository's configs package, loaded as the other tests have it)
from llava_jax import cli
from llava_jax.settings import load_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "data", "toy")
ONE_STEP = ["--config.train.max_steps=1", "--config.log.tensorboard=False", "--config.data.workers=0",
            "--config.data.num_buckets=1", "--config.checkpoint.every=100", "--config.train.batch_size=4"]


@pytest.mark.slow
def test_a_shipped_config_runs_from_another_directory(tmp_path):
    """`python -m llava_jax.cli` in a directory of its own, with only the package importable (not
    the repository: its configs/ is found through the config file): the data from the config file
    is found in the repository, the workdir given on the command line lands in the current directory."""
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir(), cwd.mkdir()
    (site / "llava_jax").symlink_to(os.path.join(ROOT, "llava_jax"))
    config = os.path.relpath(os.path.join(ROOT, "configs", "tiny_sft.py"), cwd)  # --config FILE: from the cwd
    # conftest's precision and compile cache included; one device: one small compile
    env = {**os.environ, "PYTHONPATH": str(site), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "llava_jax.cli", "--config", config, "--config.workdir=run", *ONE_STEP]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "run" / "model").is_dir()
    assert len((cwd / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    out = done.stdout.splitlines()
    assert f"paths relative to the current directory {cwd}:" in out
    assert f"  config.workdir: run -> {cwd / 'run'}" in out
    assert f"paths relative to {ROOT}, the project root of {os.path.join(ROOT, 'configs', 'tiny_sft.py')}:" in out
    assert f"  config.data.train: data/toy/sft.json -> {TOY}/sft.json" in out


def _project(root, common_seed: int, **paths) -> str:
    """A config project of its own under `root`: configs/common.py (a base_config whose seed
    marks it) and configs/mine.py setting `paths` (dotted name -> value); the config file's path."""
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "__init__.py").write_text("")
    (root / "configs" / "common.py").write_text(
        "from llava_jax.settings import base_config as tree_defaults\n\n\ndef base_config():\n"
        f"    c = tree_defaults()\n    c.seed = {common_seed}\n    return c\n")
    sets = "".join(f"    c.{name} = {value!r}\n" for name, value in paths.items())
    (root / "configs" / "mine.py").write_text(
        f"from configs.common import base_config\n\n\ndef get_config():\n    c = base_config()\n{sets}    return c\n")
    return str(root / "configs" / "mine.py")


def test_relative_paths_resolve_against_the_config_project_or_the_current_directory(tmp_path, monkeypatch):
    proj, cwd = tmp_path / "proj", tmp_path / "cwd"
    cwd.mkdir()
    config = _project(proj, 7, workdir="runs/mine", requires="configs/other.py,/abs/first.py", **{
        "data.train": "data/train.json", "data.tokenizer": "~/tokenizer", "model.init": "tiny"})
    shipped = sys.modules["configs"]
    monkeypatch.chdir(cwd)
    s, resolved = load_settings(os.path.relpath(config, cwd), ["--config.data.image_folder=images"])
    assert s.seed == 7  # its own project's configs.common, not this repository's
    assert sys.modules["configs"] is shipped  # this repository's package back in place after loading
    assert s.workdir == str(proj / "runs" / "mine")
    assert s.requires == (str(proj / "configs" / "other.py"), "/abs/first.py")  # an absolute path stays as written
    assert s.data.train == str(proj / "data" / "train.json")
    assert s.data.image_folder == str(cwd / "images")  # given on the command line
    assert s.data.tokenizer == os.path.expanduser("~/tokenizer")
    assert (s.model.init, s.data.captions) == ("tiny", "")  # a word that is not a path, and "" (unset), as written
    assert [(r.field, r.written) for r in resolved] == [
        ("config.workdir", "runs/mine"), ("config.requires", "configs/other.py"),
        ("config.data.train", "data/train.json"), ("config.data.image_folder", "images"),
        ("config.data.tokenizer", "~/tokenizer")]


def test_a_missing_path_error_names_the_field_what_was_written_and_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_quiet_logging", lambda: None)  # absl's global logging setup: not in the test process
    monkeypatch.chdir(tmp_path)
    base = [f"--config.workdir={tmp_path / 'w'}", *ONE_STEP]
    with pytest.raises(SystemExit) as e:  # given on the command line: against the current directory
        cli.main(["--config", os.path.join(ROOT, "configs", "tiny_sft.py"), "--config.data.train=missing.json", *base])
    assert e.value.code == (f"error: config.data.train='missing.json' does not exist ({tmp_path / 'missing.json'}, "
                            f"relative to the current directory {tmp_path})")
    config = _project(tmp_path / "proj", 0, stage="sft", **{"data.train": "data/missing.json",
                                                            "data.tokenizer": os.path.join(TOY, "tokenizer")})
    with pytest.raises(ValueError) as e:  # written in a config file: against its project root
        cli.train(config, base)
    root = tmp_path / "proj"
    assert str(e.value) == (f"config.data.train='data/missing.json' does not exist ({root / 'data' / 'missing.json'}, "
                            f"relative to {root}, the project root of {config})")


def test_every_entry_is_the_package_driver():
    import scripts.train

    assert scripts.train.main is cli.main  # scripts/train.py: a thin wrapper
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["llava-jax-train"]
    assert target == "llava_jax.cli:main"
    args = cli.parse_args(["--config=configs/tiny_sft.py", "--config.train.max_steps=3", "--config.log.tensorboard",
                           "--coordinator", "h:1", "--num_processes", "2", "--process_id", "1"])
    assert args == cli.Args("configs/tiny_sft.py", ("--config.train.max_steps=3", "--config.log.tensorboard"),
                            "h:1", 2, 1)  # the overrides as given: the settings' one parser reads them
