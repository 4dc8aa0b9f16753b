"""scripts/generate.py on the bundled toy eval files: formats, resume, POPE report."""
import json

import jax
import numpy as np
import pytest

from llava_jax.models.weights import save_checkpoint
from llava_jax.data.toy import TOY_DIR
from llava_jax.models.llava import init_params, tiny_config
from scripts.generate import main as generate_main


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gen") / "ckpt")
    config = tiny_config()
    save_checkpoint(path, config, jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0))))
    return path


def _args(ckpt, questions, fmt, out):
    return ["--ckpt", ckpt, "--tokenizer", f"{TOY_DIR}/tokenizer", "--questions", str(questions),
            "--image-folder", f"{TOY_DIR}/images", "--format", fmt, "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "4"]


def test_pope_answers_resume_and_scores(tiny_ckpt, tmp_path, capsys):
    lines = open(f"{TOY_DIR}/eval/pope.jsonl").read().splitlines()[:12]
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(lines[:6]) + "\n")
    full = tmp_path / "full.jsonl"
    full.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    generate_main(_args(tiny_ckpt, first, "pope", out))
    assert len(out.read_text().splitlines()) == 6
    scores = generate_main(_args(tiny_ckpt, full, "pope", out))
    printed = capsys.readouterr().out
    assert "12 questions, 6 already answered" in printed and "F1" in printed and "yes-ratio" in printed
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == sorted(json.loads(line)["question_id"] for line in lines)
    assert all(set(a) >= {"question_id", "prompt", "text", "answer_id", "model_id"} for a in answers)
    labels = [json.loads(line)["label"] for line in lines]
    yes = [a["text"] for a in answers]
    assert scores["all"]["n"] == 12 and 0.0 <= scores["all"]["accuracy"] <= 1.0
    assert scores["all"]["yes_ratio"] == pytest.approx(
        sum(1 for t in yes if not any(w in t.split(".")[0].replace(",", "").split(" ") for w in ("No", "no", "not")))
        / 12)
    assert len(labels) == 12


def test_llava_rlhf_protocol_settings_reach_the_run(tiny_ckpt, tmp_path, capsys):
    """The protocol fills what the command line leaves unset (an explicit length still wins)."""
    questions = tmp_path / "pope.jsonl"
    questions.write_text("\n".join(open(f"{TOY_DIR}/eval/pope.jsonl").read().splitlines()[:4]) + "\n")
    out = tmp_path / "protocol.jsonl"
    generate_main(_args(tiny_ckpt, questions, "pope", out) + ["--protocol", "llava-rlhf"])
    printed = capsys.readouterr().out
    assert ("protocol llava-rlhf: template llava_v1, temperature 0.2, max_new_tokens 6, question suffix "
            "'\\\\nAnswer the question using a single word or phrase.'") in printed  # a backslash and an "n"
    assert len(out.read_text().splitlines()) == 4


def test_mmhal_answers_and_judge_file(tiny_ckpt, tmp_path):
    items = json.load(open(f"{TOY_DIR}/eval/mmhal.json"))[:5]
    questions = tmp_path / "mmhal.json"
    questions.write_text(json.dumps(items))
    out = tmp_path / "mmhal_answers.json"
    generate_main(_args(tiny_ckpt, questions, "mmhal", out))
    answers = json.load(open(out))
    assert len(answers) == 5 and all("model_answer" in a and a["gt_answer"] for a in answers)
    judge = [json.loads(line) for line in open(str(out) + ".judge.jsonl")]
    assert [j["question"] for j in judge] == [i["question"] for i in items]


@pytest.mark.slow
def test_eval_toy_script_writes_answers_and_table(tiny_ckpt, tmp_path, capsys):
    """scripts/eval_toy.py on two models (the same random checkpoint, without and with a
    zero-initialised LoRA adapter directory: identical answers), its files and its table."""
    from llava_jax.models import lora as lora_lib
    from llava_jax.models.weights import load_checkpoint, write_adapter_dir
    from scripts.eval_toy import main as eval_toy

    _, base = load_checkpoint(tiny_ckpt)
    write_adapter_dir(str(tmp_path / "adapter"), lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=2, alpha=4.0),
                                                                      jax.random.PRNGKey(1)))
    summary = eval_toy([f"a={tiny_ckpt}", f"b={tiny_ckpt}:{tmp_path / 'adapter'}", "--out", str(tmp_path / "eval"),
                        "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "answers naming an absent object" in printed and "| a |" in printed and "| b |" in printed
    assert summary["a"] == summary["b"] and summary["a"]["n"] == 256  # b = 0: the adapter is the base
    assert json.load(open(tmp_path / "eval" / "summary.json")) == summary
    for kind, count in (("answers", 256), ("pope", 214), ("mc", 64)):
        rows = [json.loads(line) for line in open(tmp_path / "eval" / f"a.{kind}.jsonl")]
        assert len(rows) == count and all(r["image"].startswith("eval_") for r in rows)
    assert all(0.0 <= v <= 1.0 for k, v in summary["a"].items() if k not in ("n", "mean_length"))


def test_a_torn_last_line_is_dropped_and_the_rerun_appends(tiny_ckpt, tmp_path):
    """A kill mid-write leaves half a record: the rerun drops it, answers that question again
    and appends after the last whole line."""
    lines = open(f"{TOY_DIR}/eval/pope.jsonl").read().splitlines()[:4]
    questions = tmp_path / "pope.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    generate_main(_args(tiny_ckpt, questions, "pope", out))
    whole = out.read_text().splitlines()
    out.write_text("\n".join(whole[:3]) + "\n" + whole[3][: len(whole[3]) // 2])
    generate_main(_args(tiny_ckpt, questions, "pope", out))
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in again] == [json.loads(line)["question_id"] for line in whole]
    assert [a["text"] for a in again] == [json.loads(line)["text"] for line in whole]  # greedy: the same answer


@pytest.mark.slow
def test_answers_over_a_mesh_equal_one_device(tiny_ckpt, tmp_path):
    """--mesh lays weights, prompts and cache over the 8 test devices or over one; same answers."""
    questions = tmp_path / "pope.jsonl"
    questions.write_text("\n".join(open(f"{TOY_DIR}/eval/pope.jsonl").read().splitlines()[:8]) + "\n")
    texts = {}
    for mesh in ("fsdp=-1", "data=2,fsdp=4", "fsdp=1"):
        out = tmp_path / f"{mesh}.jsonl"
        generate_main(_args(tiny_ckpt, questions, "pope", out) + ["--mesh", mesh])
        texts[mesh] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts["fsdp=-1"] == texts["data=2,fsdp=4"] == texts["fsdp=1"] and len(texts["fsdp=1"]) == 8


@pytest.mark.parametrize("bad", ["ckpt", "adapter", "questions"])
def test_bad_inputs_end_in_one_error_line(tiny_ckpt, tmp_path, bad):
    questions = tmp_path / "pope.jsonl"
    questions.write_text(open(f"{TOY_DIR}/eval/pope.jsonl").readline())
    args = _args(tiny_ckpt, questions, "pope", tmp_path / "out.jsonl")
    if bad == "ckpt":
        args[args.index("--ckpt") + 1] = str(tmp_path / "missing_ckpt")
    elif bad == "adapter":
        args += ["--adapter", "no_such_adapter"]
    else:
        args[args.index("--questions") + 1] = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit) as stop:
        generate_main(args)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert {"ckpt": "missing_ckpt", "adapter": "no_such_adapter", "questions": "missing.jsonl"}[bad] in message
