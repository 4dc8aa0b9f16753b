#!/usr/bin/env python
"""Answers for an eval question file (LLaVA model_vqa, POPE or MMHal-Bench), batched.

  python scripts/generate.py --ckpt CKPT [--adapter policy] --tokenizer DIR --questions FILE \\
      --image-folder DIR --format vqa|pope|mmhal --out FILE [--protocol llava-rlhf|llava-rlhf-newline] \\
      [--template vicuna_v1] [--temperature 0] [--top-p 1] [--max-new-tokens 128] [--question-suffix TEXT]

`--protocol llava-rlhf` prompts and decodes exactly as LLaVA-RLHF's published evaluation
(llava_v1 template; POPE: '\\nAnswer the question using a single word or phrase.' after each
question, a backslash and an "n" as its eval_pope.sh passed it, temperature 0.2, 64 new tokens;
LLaVA-Bench (vqa): temperature 0.2, 1024 tokens; MMHal-Bench: greedy, 1024 tokens), so the
numbers compare with the paper's tables; `--protocol llava-rlhf-newline` is the same with a
real newline before POPE's "Answer" (model_vqa.py's default, LLaVA's own prompts); flags
given explicitly still win. The default protocol: vicuna_v1, greedy, 128 tokens, no suffix.
Temperature 0 is greedy. Weights, prompts and KV cache are sharded over a mesh of every local
device (`--mesh`). Answers are appended as they come; a rerun skips questions already
answered in --out. POPE
also prints accuracy, precision, recall, F1 and yes-ratio (as the POPE evaluation computes
them, per `category` when the file has one). MMHal-Bench answers are the items with
`model_answer` filled in (the layout its GPT-4 judging script reads) plus a compact
`<out>.judge.jsonl`; the judging itself needs a network and is not run here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# transformers serves only tokenizers here; without torch installed (the main command's
# install) it would advise at import that "PyTorch was not found", which does not apply.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tqdm import tqdm  # noqa: E402


def _key(answer_or_question: dict, fmt: str) -> str:
    """Identity of a question across runs (MMHal items have no id: question + image)."""
    record = answer_or_question
    if fmt == "mmhal":
        return json.dumps([record.get("question"), record.get("image_path") or record.get("image_src")])
    return json.dumps(record.get("question_id"))


def progress_path(out: str, fmt: str) -> str:
    """Where answers are appended as they come: the answers file itself (JSONL), or for
    MMHal-Bench (one JSON list, written at the end) a JSONL beside it."""
    return out + ".partial.jsonl" if fmt == "mmhal" else out


def read_jsonl_answers(path: str) -> list[dict]:
    """Answers of a JSONL file appended to by an earlier run; a torn last line (a run killed
    mid-write) is dropped and cut from the file, so the next append starts on a clean line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    answers, good_bytes = [], 0
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                answers.append(json.loads(line))
            except json.JSONDecodeError:
                if any(rest.strip() for rest in lines[number:]):
                    raise ValueError(f"{path}:{number}: not a JSON answer record") from None
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                return answers
        good_bytes += len(line) + 1
    if data and not data.endswith(b"\n"):  # a whole record whose newline was not written
        with open(path, "ab") as f:
            f.write(b"\n")
    return answers


def read_answers(out: str, fmt: str) -> list[dict]:
    """Every answer written so far: the finished file and, for MMHal-Bench, the progress file."""
    answers = read_jsonl_answers(progress_path(out, fmt))
    if fmt == "mmhal" and os.path.isfile(out):
        with open(out) as f:
            answers = json.load(f) + answers
    return answers


def append_answers(path: str, answers: list[dict]) -> None:
    """One batch's answers appended and flushed (a rerun resumes by reading them)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for answer in answers:
            f.write(json.dumps(answer) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finish_mmhal(out: str, answers: list[dict]) -> None:
    """The MMHal-Bench JSON list, written atomically; then the progress file goes."""
    from llava_jax.data import write_answers

    tmp = out + ".tmp"
    write_answers(tmp, answers, "mmhal")
    os.replace(tmp, out)
    if os.path.exists(progress_path(out, "mmhal")):
        os.remove(progress_path(out, "mmhal"))


def report_pope(questions_path: str, answers: list[dict]) -> dict:
    from llava_jax.eval.pope import pope_by_category

    with open(questions_path) as f:
        questions = {json.dumps(q["question_id"]): q for q in (json.loads(line) for line in f if line.strip())}
    rows = [(questions[_key(a, "pope")].get("category", ""), a["text"], questions[_key(a, "pope")]["label"])
            for a in answers if _key(a, "pope") in questions]
    scores = pope_by_category(rows)
    print(f"{'category':<14}{'n':>5}{'accuracy':>10}{'precision':>11}{'recall':>8}{'F1':>8}{'yes-ratio':>11}")
    for name, s in scores.items():
        print(f"{name:<14}{s['n']:>5}{s['accuracy']:>10.4f}{s['precision']:>11.4f}{s['recall']:>8.4f}"
              f"{s['f1']:>8.4f}{s['yes_ratio']:>11.4f}")
    return scores


def main(argv: list[str] | None = None) -> dict | None:
    from llava_jax.data.eval_data import PROTOCOLS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="converted checkpoint (tools/convert_hf.py import)")
    p.add_argument("--adapter", help="adapter name inside the checkpoint (e.g. policy), or an adapter directory "
                   "(a LoRA or PPO run's workdir/adapter)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--questions", required=True)
    p.add_argument("--image-folder", default="")
    p.add_argument("--format", choices=("vqa", "pope", "mmhal"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", default="default", choices=tuple(PROTOCOLS),
                   help="template, question suffix, temperature and length of a published evaluation")
    p.add_argument("--temperature", type=float, help="(protocol's) 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, help="(protocol's)")
    p.add_argument("--question-suffix", help="text appended to every question (protocol's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", help="conversation template (protocol's)")
    p.add_argument("--max-length", type=int, default=2048, help="longest prompt (tokens, image included)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute")
    p.add_argument("--mesh", default="fsdp=-1",
                   help="AXIS=SIZE[,...] over data, fsdp, tensor (-1: fill; default: every local device, as training)")
    p.add_argument("--model-id", help="model_id written into answers (default: checkpoint[/adapter] name)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import jax

    from llava_jax.platforms import skip_absent_tpu

    skip_absent_tpu()  # before any backend starts
    from llava_jax import sharding
    from llava_jax.generate.answer import answer_batches, load_answering_model
    from llava_jax.data import EvalDataset, load_tokenizer, make_answer, vision_kwargs
    from llava_jax.files import ConversionError
    from llava_jax.generate.sampling import SamplingConfig
    from llava_jax.settings import cpu_shapes_on

    protocol = PROTOCOLS[a.protocol][a.format]
    for field in ("template", "temperature", "max_new_tokens"):
        if getattr(a, field) is None:
            setattr(a, field, getattr(protocol, field))
    suffix = protocol.suffix if a.question_suffix is None else a.question_suffix
    print(f"protocol {a.protocol}: template {a.template}, temperature {a.temperature}, max_new_tokens "
          f"{a.max_new_tokens}, question suffix {suffix!r}")
    try:
        mesh = sharding.make_mesh(sharding.parse_mesh(a.mesh))
    except ValueError as e:
        p.error(str(e))
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s), {a.dtype}; "
          f"model.cpu_shapes auto: {'on' if cpu_shapes_on('auto', mesh.devices.flat[0].platform) else 'off'}")
    try:
        config, base, adapter = load_answering_model(a.ckpt, a.adapter, a.dtype, mesh=mesh)
        tokenizer = load_tokenizer(a.tokenizer)
        dataset = EvalDataset(a.questions, tokenizer, fmt=a.format, image_folder=a.image_folder,
                              template=a.template, max_length=a.max_length, suffix=suffix, **vision_kwargs(config))
        answers = read_answers(a.out, a.format)
    except (ConversionError, OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {type(e).__name__ + ': ' if isinstance(e, KeyError) else ''}{e}")
    done = {_key(ans, a.format) for ans in answers}
    total = len(dataset)
    dataset = dataset.subset([i for i, item in enumerate(dataset.items)
                              if _key(item.data["question"].record or {"question_id": item.data["question"].question_id},
                                      a.format) not in done])
    todo = dataset.items
    model_id = a.model_id or os.path.basename(os.path.normpath(a.ckpt)) + (f"/{a.adapter}" if a.adapter else "")
    print(f"{total} questions, {total - len(todo)} already answered in {a.out}")

    if todo:
        sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                  top_k=a.top_k, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                  cache_dtype=a.dtype)
        with tqdm(total=len(todo), desc="generate", unit="q") as bar:
            for rows in answer_batches(config, base, adapter, tokenizer, dataset, sampling,
                                       a.batch_size, a.seed, mesh=mesh):
                new = [make_answer(question, text, model_id=model_id, fmt=a.format) for question, text, _ in rows]
                append_answers(progress_path(a.out, a.format), new)
                answers += new
                bar.update(len(rows))
        print(dataset.report.summary())
    if a.format == "mmhal":
        finish_mmhal(a.out, answers)
    print(f"wrote {len(answers)} answers to {a.out}")
    if a.format == "mmhal":
        judge = a.out + ".judge.jsonl"
        with open(judge, "w") as f:
            for ans in answers:
                f.write(json.dumps({k: ans.get(k) for k in ("question_type", "question_topic", "image_content",
                                                            "question", "gt_answer", "model_answer")}) + "\n")
        print(f"judge-ready file: {judge} (GPT-4 judging needs a network; not run here)")
    if a.format == "pope":
        return report_pope(a.questions, answers)
    return None


if __name__ == "__main__":
    main()
