"""The compile check on the tiny model and the 8 forced CPU devices: its memory figures
agree with byte counts made independently from the shardings, and the fits columns flip."""
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from configs.common import base_config
from configs.tiny_rm import get_config as tiny_rm
from configs.tiny_sft import get_config as tiny_sft
from llava_jax import sharding
from llava_jax.aot import compile_check as cc, report as compile_report
from llava_jax.settings import RunSettings
from llava_jax.models.weights import FORMAT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What each step never reads: SFT's loss_mask (labels carry the mask), CLIP's final norm
# (features come from the penultimate layer); the RM reads hidden states, not lm_head.
UNUSED = {"sft": ("loss_mask", "vision/post_norm"),
          "rm": ("hallucination", "vision/post_norm", "llm/lm_head")}


def _flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shards(leaf, mesh):
    """How many pieces a leaf is cut into: the product of the mesh axes its spec names."""
    spec = [(e,) if isinstance(e, str) else e for e in leaf.sharding.spec if e is not None]
    axes = [a for entry in spec for a in entry]
    return math.prod(mesh.shape[a] for a in axes)


def _expected(tree, mesh):
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        assert nbytes % _shards(leaf, mesh) == 0
        total += nbytes // _shards(leaf, mesh)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("make_cfg, mesh_shape", [(tiny_sft, (1, 8, 1)), (tiny_rm, (2, 2, 2))])
def test_memory_figures_match_the_shardings(make_cfg, mesh_shape):
    os.chdir(ROOT)
    cfg = RunSettings.from_config(make_cfg())
    mesh = sharding.make_mesh(mesh_shape)
    ctx = cc.Context(cfg, mesh, cc.with_runtime(cfg, cc.resolve_model(cfg.model.init, None)[0]))
    step = cc.STEP_BUILDERS[f"{cfg.stage}_step"](ctx)
    report = cc.compile_step(step, mesh)
    state, frozen, batch = step.args

    # Every base param is counted once (trainable or frozen), plus the adapter / head.
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(cc.abstract_base(ctx.config)))
    n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(frozen))
    n_train = {k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in state.params.items()}
    assert n_frozen + n_train.get("base", 0) == n_base
    assert set(n_train) == ({"base"} if cfg.stage == "sft" else {"adapter", "head"})

    assert report.params == _expected((state.params, frozen), mesh)
    assert report.opt == _expected(state.opt_state, mesh)
    assert any(_shards(x, mesh) > 1 for x in jax.tree_util.tree_leaves(state.params))  # really sharded
    # XLA's own count of the arguments is the same sum (batch, step and rng included) less
    # the inputs jit drops because the step never reads them.
    unused = UNUSED[cfg.stage]
    dropped = {k: v for k, v in _flat((state, frozen, batch)).items() if any(u in k for u in unused)}
    assert {u for u in unused if any(u in k for k in dropped)} == set(unused)
    assert report.memory["argument"] == _expected((state, frozen, batch), mesh) - _expected(dropped, mesh)
    # The donated state comes back in place: only the metrics are new outputs.
    assert report.memory["alias"] == _expected((state.params, state.opt_state), mesh) + _expected(
        (state.step, state.rng), mesh)
    assert report.temp > 0 and report.compile_seconds > 0
    # Total: everything on a device, the dropped inputs included (they are still resident).
    assert report.total == (_expected((state, frozen, batch), mesh) + report.memory["output"]
                            - report.memory["alias"] + report.temp)

    assert report.fits(report.total) and not report.fits(report.total - 1)
    table = compile_report.format_table([report], {"tiny": 1024, "big": 1 << 40})
    row = table.splitlines()[-1].split(" | ")
    assert row[-2:] == ["NO", "yes |"]


@pytest.mark.slow
def test_ppo_rollout_and_update_compile():
    cfg = base_config()
    cfg.stage, cfg.train.trainable, cfg.train.lora_rank = "ppo", "lora", 4
    cfg.ppo.rollout_batch, cfg.ppo.step_batch, cfg.ppo.grad_accum = 8, 8, 2
    cfg.ppo.max_query_tokens, cfg.ppo.response_len = 8, 4
    mesh = sharding.make_mesh((1, 8, 1))
    cfg = RunSettings.from_config(cfg)
    reports = cc.check(cfg, mesh, log=lambda _: None)
    assert [r.name for r in reports] == ["rollout_generate", "rollout_score", "ppo_step"]
    # Resident: the policy base + 4 adapters + 2 heads; AdamW moments of policy, value and its head.
    ctx = cc.Context(cfg, mesh, cc.with_runtime(cfg, cc.tiny_config()))
    (trained, frozen), opt = params, opt = cc.ppo_trees(ctx).resident
    assert set(trained) == {"policy", "value", "value_head"}
    assert set(frozen) == {"policy_base", "ref", "reward", "reward_head"}
    size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree) if x.ndim)  # noqa: E731
    assert size(opt) == 2 * size(trained)  # AdamW's two moments of the trained params, nothing of the frozen
    for report in reports:
        assert report.temp > 0 and report.compile_seconds > 0, report.name
        assert report.params == _expected(params, mesh) and report.opt == _expected(opt, mesh), report.name


def test_presets_and_parsing(tmp_path):
    llm = {name: sum(x.size for x in jax.tree_util.tree_leaves(cc.abstract_base(cc.model_preset(name))["llm"]))
           for name in ("7b", "13b")}
    assert llm == {"7b": 6_738_415_616, "13b": 13_015_864_320}  # Vicuna-7B / 13B parameter counts
    assert cc.model_preset("7b").num_image_tokens == 256 and cc.model_preset("13b").num_image_tokens == 576
    assert cc.resolve_model("runs/sft_13b/model", None)[0] == cc.model_preset("13b")
    assert cc.resolve_model("runs/sft_13b/model", "7b")[0] == cc.model_preset("7b")
    with pytest.raises(ValueError, match="--model"):
        cc.resolve_model("runs/unnamed/model", None)
    ckpt = tmp_path / "sft_13b"  # an existing checkpoint's config.json wins over the name
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"format": FORMAT, "llava": cc.tiny_config().to_dict()}))
    assert cc.resolve_model(str(ckpt), None)[0] == cc.tiny_config()

    assert cc.parse_bytes("16GiB") == 16 * 2**30 == cc.parse_bytes("16G") and cc.parse_bytes("80GB") == 80 * 10**9
    assert cc.parse_mesh("data=1,fsdp=8,tensor=1") == (1, 8, 1) == cc.parse_mesh("fsdp=8") == cc.parse_mesh("1,8,1")
    with pytest.raises(ValueError):
        cc.parse_mesh("pipeline=2")
    cfg = tiny_sft()
    cc.apply_overrides(cfg, ["--config.model.remat=dots", "--config.train.grad_accum=4",
                             "--config.log.tensorboard=false"])
    assert (cfg.model.remat, cfg.train.grad_accum, cfg.log.tensorboard) == ("dots", 4, False)
    with pytest.raises(ValueError, match="no such config field; closest: model"):
        cc.apply_overrides(cfg, ["--config.model.nope=1"])
