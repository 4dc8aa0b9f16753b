"""scripts/generate.py on the bundled toy eval files: formats, resume, POPE report."""
import json

import jax
import numpy as np
import pytest

from llava_jax.convert import save_checkpoint
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
