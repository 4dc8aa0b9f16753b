"""Stage datasets in the LLaVA-RLHF formats, and every bad-input case (skip + count, or strict)."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import (IGNORE_INDEX, BadRecord, EvalDataset, ImageProcessor, Loader, PreferenceDataset,
                            RLPromptDataset, SFTDataset, Turn, USER, caption_key, encode_prompt, load_eval_questions,
                            load_tokenizer, lookup_captions, make_answer, write_answers)
from llava_jax.data.toy import TOY_DIR

N, IMG = 4, 511


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(os.path.join(TOY_DIR, "tokenizer"))


@pytest.fixture
def folder(tmp_path):
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "good.png")
    Image.fromarray(np.full((30, 30, 3), 20, np.uint8)).save(tmp_path / "other.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return tmp_path


def write(folder, name, records):
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


def kw(folder, **extra):
    return dict(image_folder=str(folder), image_processor=ImageProcessor.for_image_size(28), num_image_tokens=N,
                image_token_index=IMG, **extra)


def qa(q="What is it?", a="A red circle."):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


def all_examples(dataset):
    return [ex for ex in (dataset.load(i) for i in range(len(dataset))) if ex is not None]


SFT_BAD = [  # (record, reason); the reason is found while reading (parse) or while loading (load)
    ({"id": "m", "image": "missing.png", "conversations": qa()}, "missing_image"),
    ({"id": "c", "image": "bad.png", "conversations": qa()}, "corrupt_image"),
    ({"id": "f"}, "missing_field"),
    ({"id": "v", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]}, "missing_field"),
    ({"id": "i", "image": 7, "conversations": qa()}, "missing_field"),
    (["not", "a", "dict"], "missing_field"),
    ({"id": "e", "conversations": []}, "empty_conversation"),
    ({"id": "q", "conversations": qa()[:1]}, "empty_conversation"),
    ({"id": "r", "conversations": qa() + qa()[::-1]}, "bad_roles"),
]


def test_sft_bad_input_is_skipped_counted_and_warned(folder, tok, caplog):
    good = [{"id": "g1", "image": "good.png", "conversations": qa()}, {"id": "g2", "conversations": qa()}]
    records = good[:1] + [r for r, _ in SFT_BAD] + good[1:]
    path = write(folder, "sft.json", records)
    with caplog.at_level(logging.WARNING, logger="llava_jax.data"):
        dataset = SFTDataset(path, tok, **kw(folder))
        loader = Loader(dataset, 2, shuffle=False, num_epochs=1, drop_remainder=False, num_workers=2,
                        process_index=0, process_count=1)
        batches = list(loader)
    seen = [m["id"] for b in batches for m in b["meta"] if m is not None]
    assert sorted(seen) == ["g1", "g2"]
    expected = {}
    for _, reason in SFT_BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dataset.report.skipped == expected
    for k, (_, reason) in enumerate(SFT_BAD, start=1):  # each warning names file, record index and reason
        assert any(f"sft.json record {k} ({reason})" in r.getMessage() for r in caplog.records), (k, reason)
    summary = loader.summary()
    assert f"{len(records)} records, {len(SFT_BAD)} skipped" in summary and "corrupt_image=1" in summary


@pytest.mark.parametrize("record,reason", SFT_BAD)
def test_sft_strict_mode_raises(folder, tok, record, reason):
    path = write(folder, "one.json", [{"conversations": qa()}, record])
    with pytest.raises(BadRecord) as err:
        dataset = SFTDataset(path, tok, strict=True, **kw(folder))
        list(Loader(dataset, 1, shuffle=False, num_epochs=1, process_index=0, process_count=1))
    assert err.value.reason == reason and err.value.index == 1 and "one.json[1]" in str(err.value)


def test_sft_example_layout(folder, tok):
    path = write(folder, "sft.json", [{"id": "a", "image": "good.png", "conversations": qa()},
                                      {"id": "b", "conversations": qa()}])
    with_image, text_only = all_examples(SFTDataset(path, tok, **kw(folder)))
    assert (with_image["input_ids"] == IMG).sum() == N and not (text_only["input_ids"] == IMG).any()
    assert with_image["pixel_values"].shape == (28, 28, 3) and text_only["pixel_values"] is None
    target = with_image["loss_mask"].astype(bool)
    assert tok.decode(with_image["input_ids"][target]) == "A red circle."
    assert (with_image["labels"][~target] == IGNORE_INDEX).all()
    assert with_image["input_ids"][target][-1] == tok.eos_id


def test_a_held_out_subset_counts_its_skips_in_its_own_report(folder, tok):
    records = [{"id": str(i), "image": "bad.png" if i == 3 else "good.png", "conversations": qa()} for i in range(5)]
    dataset = SFTDataset(write(folder, "sft.json", records), tok, **kw(folder))
    held, train = dataset.subset([3, 1], split="held out"), dataset.subset([0, 2, 4])
    assert [it.index for it in held.items] == [3, 1] and [it.index for it in train.items] == [0, 2, 4]
    assert len(dataset) == 5  # the source dataset is not changed
    assert len(all_examples(held)) == 1 and len(all_examples(train)) == 3
    assert held.report.skipped == {"corrupt_image": 1} and held.report.source == "sft.json (held out)"
    assert train.report is dataset.report and dataset.report.skipped == {}


def test_sft_too_long_truncated_or_skipped(folder, tok):
    long = qa(a="There is a red circle in the top left. " * 20)
    path = write(folder, "sft.json", [{"image": "good.png", "conversations": long}])
    dataset = SFTDataset(path, tok, max_length=60, **kw(folder))
    (example,) = all_examples(dataset)
    assert len(example["input_ids"]) == 60 and (example["input_ids"] == IMG).sum() == N
    assert dataset.report.num_truncated == 1 and "1 truncated" in dataset.report.summary()
    tiny = SFTDataset(path, tok, max_length=10, **kw(folder))  # the image itself would be cut
    assert all_examples(tiny) == [] and tiny.report.skipped == {"too_long": 1}


def test_jsonl_records_and_invalid_lines(folder, tok):
    path = write(folder, "sft.jsonl", [{"conversations": qa()}, "{not json", {"conversations": qa()}])
    dataset = SFTDataset(path, tok, **kw(folder))
    assert len(dataset) == 2 and dataset.report.skipped == {"invalid_json": 1}
    assert [ex["meta"]["index"] for ex in all_examples(dataset)] == [0, 2]


def pair(pref=1, **extra):
    return {"id": "p", "image": "good.png", "conversations": qa(a=""), "output_1": {"from": "gpt", "value": "Red."},
            "output_2": {"from": "gpt", "value": "Blue."}, "preference": pref, **extra}


def test_preference_pairs(folder, tok):
    captions = {"good.png": ["c1", "c2", "c3", "c4", "c5"]}
    records = [pair(1, hallucination=True), pair(2), pair(3), pair("1"), pair(True), pair(None),
               {**pair(1), "output_2": "Blue."}, {**pair(1), "output_1": {"from": "gpt"}},
               {**pair(1), "conversations": qa() + qa()[:1] + qa()[:1]}, {**pair(1), "image": "other.png"}]
    path = write(folder, "pref.json", records)
    dataset = PreferenceDataset(path, tok, captions=captions, seed=3, **kw(folder))
    assert dataset.report.skipped == {"bad_preference": 4, "missing_field": 2, "bad_roles": 1, "missing_captions": 1}
    loader = Loader(dataset, 2, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    (batch,) = list(loader)
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["choice"].tolist() == [0, 1] and batch["hallucination"].tolist() == [1, -1]
    for side, answer in ((0, "Red."), (1, "Blue.")):
        ids = batch["input_ids"][0, side][batch["attention_mask"][0, side] == 1]
        assert ids[-1] == tok.eos_id and (ids == IMG).sum() == N
        assert tok.decode(ids).endswith("ASSISTANT: " + answer)
    meta = batch["meta"][0]
    assert sorted(meta["captions"]) == captions["good.png"] and meta["captions"] != captions["good.png"]
    again = PreferenceDataset(path, tok, captions=captions, seed=3, **kw(folder))
    assert again.load(0)["meta"]["captions"] == meta["captions"]  # shuffled, but fixed for a seed


def test_preference_custom_encoder_and_too_long(folder, tok):
    calls = []

    def encode_fn(turns, captions, n_image):
        calls.append((turns[-1].text, captions, n_image))
        from llava_jax.data import encode_conversation
        return encode_conversation(turns, tok, num_image_tokens=n_image, image_token_index=IMG)

    path = write(folder, "pref.json", [pair(2)])
    dataset = PreferenceDataset(path, tok, captions={"good.png": ["only"]}, encode_fn=encode_fn, **kw(folder))
    assert dataset.load(0)["choice"] == 1
    assert calls == [("Red.", ["only"], N), ("Blue.", ["only"], N)]
    short = PreferenceDataset(path, tok, max_length=20, **kw(folder))  # a pair is never cut, only skipped
    assert short.load(0) is None and short.report.skipped == {"too_long": 1}


def rl(ctype=None, image="good.png", q="What is it?", **extra):
    record = {"id": "r", "image": image, "conversations": qa(q=q, a=""), **extra}
    if ctype is not None:
        record["caption_type"] = ctype
    return record


def test_rl_prompts_with_captions_and_aok_rule(folder, tok):
    captions = {"good.png": ["a grey picture"], "aok_good.png": ["the answer is B"], "other.png": ["dark"]}
    assert caption_key("coco/good.png", 3) == "aok_good.png" and caption_key("good.png", 6) == "good.png"
    assert lookup_captions(captions, "good.png", 2) == ["the answer is B"]
    assert lookup_captions(captions, "x.png") is None
    records = [rl(), rl(3, length_bonus=0.5), rl(6, image="other.png"), rl(7, image="other.png"),
               rl(9), rl(True), rl(2, image="other.png"), rl(1, length_bonus="big"), rl(1, q="long " * 200)]
    path = write(folder, "rl.json", records)
    reward = ImageProcessor.for_image_size(42)
    dataset = RLPromptDataset(path, tok, captions=captions, max_query_tokens=60, reward_image_processor=reward,
                              **kw(folder))
    assert dataset.max_length == 60 - 1 + N
    examples = all_examples(dataset)
    assert dataset.report.skipped == {"bad_caption_type": 2, "missing_captions": 1, "missing_field": 1, "too_long": 1}
    assert [e["caption_type"] for e in examples] == [1, 3, 6, 7]
    assert [e["length_bonus"] for e in examples] == [1.0, 0.5, 1.0, 1.0]
    assert [e["meta"]["captions"] for e in examples] == [["a grey picture"], ["the answer is B"], ["dark"], ["dark"]]
    assert [e["meta"]["answer"] for e in examples] == [None, "B", "No", "Yes"]
    prompt = encode_prompt([Turn(USER, "What is it?")], tok, num_image_tokens=N, image_token_index=IMG)
    assert examples[0]["input_ids"].tolist() == prompt.ids.tolist()
    assert tok.decode(examples[0]["input_ids"]).endswith("What is it? ASSISTANT:")
    assert examples[0]["reward_pixel_values"].shape == (42, 42, 3)
    loader = Loader(dataset, 4, shuffle=False, num_epochs=1, pad_side="left", buckets=(dataset.max_length,),
                    process_index=0, process_count=1)
    (batch,) = list(loader)
    assert batch["input_ids"].shape == (4, dataset.max_length) and batch["attention_mask"][:, -1].all()
    assert batch["reward_pixel_values"].shape == (4, 42, 42, 3) and batch["caption_type"].dtype == np.int32


def test_eval_formats(folder, tok):
    vqa = write(folder, "q.jsonl", [{"question_id": 7, "image": "good.png", "text": "Describe it."},
                                    {"question_id": 8, "text": "Text only?"}])
    pope = write(folder, "pope.jsonl", [{"question_id": 0, "image": "good.png", "text": "Is there a cat?",
                                         "label": "no"},
                                        {"question_id": 1, "image": "good.png", "text": "Is it grey?", "label": "Yes"}])
    mmhal = write(folder, "mmhal.json", [{"question_type": "attribute", "question_topic": "t", "image_id": "x",
                                          "image_src": "https://example.com/x/good.png", "image_content": ["box"],
                                          "question": "What color?", "gt_answer": "Grey."}])
    fmt, questions = load_eval_questions(vqa)
    assert fmt == "vqa" and [q.question_id for q in questions] == [7, 8] and questions[1].image is None
    fmt, questions = load_eval_questions(pope)
    assert fmt == "pope" and [q.label for q in questions] == ["no", "yes"]
    fmt, (item,) = load_eval_questions(mmhal)
    assert fmt == "mmhal" and item.image == "good.png" and item.text == "What color?"
    answer = make_answer(item, "Grey.", model_id="m", fmt="mmhal")
    assert answer["model_answer"] == "Grey." and answer["gt_answer"] == "Grey."
    answer = make_answer(questions[0], "No.", model_id="m", answer_id="a1")
    assert answer == {"question_id": 0, "prompt": "Is there a cat?", "text": "No.", "answer_id": "a1",
                      "model_id": "m", "metadata": {}}
    out = folder / "out" / "answers.jsonl"
    write_answers(str(out), [answer])
    assert json.loads(out.read_text()) == answer
    dataset = EvalDataset(pope, tok, **kw(folder))
    assert dataset.fmt == "pope" and len(dataset) == 2
    assert dataset.load(1)["meta"]["question"].label == "yes"
    bad = write(folder, "bad_pope.jsonl", [{"question_id": 0, "text": "x?", "label": "maybe"},
                                           {"question_id": 1, "text": "y?", "label": "no"}])
    assert EvalDataset(bad, tok, **kw(folder)).report.skipped == {"bad_label": 1}
    with pytest.raises(ValueError, match="bad_label"):
        load_eval_questions(bad)


@pytest.mark.parametrize("dataset", [SFTDataset, PreferenceDataset])
def test_schema_batch_shapes_are_what_collate_yields(dataset):
    """The compile check lays out its batches from Schema.batch_shapes, without data."""
    from llava_jax.data.batching import collate

    schema = dataset.batch_schema(0, (4, 4, 3))
    if schema.pairs:
        example = {"input_ids": (np.arange(3), np.arange(2)), "pixel_values": None, "choice": 1, "hallucination": 0}
    else:
        example = {"input_ids": np.arange(3), "labels": np.arange(3), "loss_mask": np.ones(3, np.int32),
                   "pixel_values": np.zeros((4, 4, 3), np.float32)}
    batch = collate([example, None], schema, [8])
    shapes = schema.batch_shapes(2, 8)
    assert set(batch) - {"meta"} == set(shapes)
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k != "meta"} == shapes
