"""Evaluation question files and answer records.

Formats (auto-detected):
* `vqa`: LLaVA `model_vqa` JSONL `{question_id, image, text}`; answers JSONL
  `{question_id, prompt, text, answer_id, model_id}`.
* `pope`: the same plus `label` ("yes"/"no").
* `mmhal`: MMHal-Bench JSON list of `{question, image_path, image_content, gt_answer,
  question_type, question_topic, ...}` (`image_src` URLs fall back to their file name);
  the answer is the item itself with `model_answer` filled in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any, Iterable, Sequence

from llava_jax.data.batching import Schema
from llava_jax.data.datasets import RecordDataset, Item, SkipRecord
from llava_jax.data.templates import USER, Turn, encode_prompt

EVAL_FORMATS = ("vqa", "pope", "mmhal")


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How a published evaluation prompts and decodes (a question file's format picks one)."""

    template: str = "vicuna_v1"
    suffix: str = ""  # appended to every question
    temperature: float = 0.0
    max_new_tokens: int = 128


# LLaVA-RLHF's runs (Eval/eval_scripts/*.sh over Eval/model_vqa*.py), per question-file format:
# POPE is model_vqa.py --short_eval True with its single-word test prompt; LLaVA-Bench is
# model_vqa.py --test-prompt ''; MMHal-Bench is model_vqa_mmhal.py --temperature 0.0
# --test-prompt ''. All use --conv-mode llava_v1 and pad images to squares. Their top_p is
# None, i.e. the checkpoint's generation_config (1.0 unless it says otherwise).
# POPE's test prompt: eval_pope.sh passes --test-prompt '\nAnswer ...' in bash single quotes,
# which keep "\n" as two characters, and model_vqa.py appends it unchanged (qs +=
# args.test_prompt), so the prompts behind the paper's POPE numbers hold a backslash and an "n"
# (`llava-rlhf`). model_vqa.py's argparse default (which the script overrides) starts with a
# real newline, as LLaVA's own short-answer prompts do (`llava-rlhf-newline`; all else the same).
POPE_INSTRUCTION = "Answer the question using a single word or phrase."
_LLAVA_RLHF: dict[str, EvalProtocol] = {
    "pope": EvalProtocol("llava_v1", "\\n" + POPE_INSTRUCTION, 0.2, 64),  # a backslash and an "n"
    "vqa": EvalProtocol("llava_v1", "", 0.2, 1024),
    "mmhal": EvalProtocol("llava_v1", "", 0.0, 1024),
}
PROTOCOLS: dict[str, dict[str, EvalProtocol]] = {
    "default": {fmt: EvalProtocol() for fmt in EVAL_FORMATS},
    "llava-rlhf": _LLAVA_RLHF,
    "llava-rlhf-newline": {**_LLAVA_RLHF, "pope": dataclasses.replace(_LLAVA_RLHF["pope"],
                                                                      suffix="\n" + POPE_INSTRUCTION)},
}


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    question_id: Any
    text: str
    image: str | None
    label: str | None = None  # POPE: "yes" / "no"
    record: dict = dataclasses.field(default_factory=dict)  # the original record (MMHal answers copy it)


def detect_format(path: str, records: Sequence[Any]) -> str:
    if path.endswith(".jsonl"):
        return "pope" if any(isinstance(r, dict) and "label" in r for r in records) else "vqa"
    return "mmhal"


def parse_question(record: Any, index: int, fmt: str) -> EvalQuestion:
    """One eval record -> EvalQuestion; raises SkipRecord("missing_field" | "bad_label")."""
    if not isinstance(record, dict):
        raise SkipRecord("missing_field", f"record is a {type(record).__name__}, not an object")
    if fmt == "mmhal":
        question = record.get("question")
        image = record.get("image_path") or (os.path.basename(record["image_src"]) if record.get("image_src") else None)
        if not isinstance(question, str) or not isinstance(image, str):
            raise SkipRecord("missing_field", "MMHal items need 'question' and 'image_path' (or 'image_src')")
        return EvalQuestion(index, question, image, record=record)
    if not isinstance(record.get("text"), str) or "question_id" not in record:
        raise SkipRecord("missing_field", "questions need 'question_id' and 'text'")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise SkipRecord("missing_field", "field 'image' is not a string")
    label = record.get("label")
    if fmt == "pope":
        label = str(label).strip().lower() if label is not None else None
        if label not in ("yes", "no"):
            raise SkipRecord("bad_label", f"POPE label must be yes/no, got {record.get('label')!r}")
    return EvalQuestion(record["question_id"], record["text"], image, label, record)


class EvalDataset(RecordDataset):
    """Questions (+ `suffix`) as generation prompts (pad LEFT); meta carries the `EvalQuestion`.

    Use the loader with `shuffle=False, num_epochs=1, drop_remainder=False` so every
    question is seen once; padding slots have `valid == 0`."""

    kind = "eval"

    def __init__(self, path: str, tokenizer, *, fmt: str | None = None, suffix: str = "", **kwargs):
        self.fmt, self.suffix = fmt, suffix
        super().__init__(path, tokenizer, **kwargs)
        self.schema = Schema(sequences={"input_ids": tokenizer.pad_id}, masks={"attention_mask": "input_ids"},
                             images={"pixel_values": self.image_processor.shape})

    def _parse(self, index, record):
        if self.fmt is None:
            # Detect from the first record: the file is read as a stream.
            self.fmt = detect_format(self.path, [record])
        if self.fmt not in EVAL_FORMATS:
            raise ValueError(f"unknown eval format {self.fmt!r}; expected one of {EVAL_FORMATS}")
        question = parse_question(record, index, self.fmt)
        return Item(index, question.image, {"question": question})

    def _build(self, item):
        question = item.data["question"]
        text = question.text  # as LLaVA's model_vqa: stripped only where it held the placeholder
        if "<image>" in text:
            text = text.replace("<image>", "").strip()
        encoded = encode_prompt([Turn(USER, text + self.suffix)], self.tokenizer, self.template,
                                num_image_tokens=self._n_image(item), image_token_index=self.image_token_index)
        encoded = self._fit(item, encoded, cut=False)
        return {"input_ids": encoded.ids, "pixel_values": self._image(item), "meta": {"question": question}}


def load_eval_questions(path: str, fmt: str | None = None) -> tuple[str, list[EvalQuestion]]:
    """(format, questions) of an eval file; raises on any bad record (eval sets must be whole)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    fmt = fmt or detect_format(path, records)
    out = []
    for index, record in enumerate(records):
        try:
            out.append(parse_question(record, index, fmt))
        except SkipRecord as e:
            raise ValueError(f"{path}[{index}]: {e.reason}: {e}") from None
    return fmt, out


def make_answer(question: EvalQuestion, text: str, *, model_id: str, fmt: str = "vqa",
                answer_id: str | None = None) -> dict:
    """The answer record of `question` in its format's answer layout."""
    if fmt == "mmhal":
        return {**question.record, "model_answer": text}
    return {"question_id": question.question_id, "prompt": question.text, "text": text,
            "answer_id": answer_id or uuid.uuid4().hex, "model_id": model_id, "metadata": {}}


def write_answers(path: str, answers: Iterable[dict], fmt: str = "vqa") -> None:
    """Writes answers: JSONL for vqa/pope, a JSON list for MMHal-Bench."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    answers = list(answers)
    with open(path, "w") as f:
        if fmt == "mmhal":
            json.dump(answers, f, indent=2)
        else:
            for answer in answers:
                f.write(json.dumps(answer) + "\n")
