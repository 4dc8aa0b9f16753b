"""The bundled toy "shapes" world: reproducible, small, clean, and usable by every stage."""
import json
import os
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from llava_jax.data import (EvalDataset, Loader, PreferenceDataset, RLPromptDataset, SFTDataset, load_captions,
                            load_tokenizer, vision_kwargs)
from llava_jax.data.toy import (DETAILED, EMBELLISH_RATE, NUM_EVAL_IMAGES, NUM_EXTRA_SFT, NUM_PAIR_IMAGES,
                                NUM_TRAIN_IMAGES, TOY_DIR, build_world, corpus, write_toy_world)
from llava_jax.eval.toy_judge import hallucinates, named_objects, scene_objects
from llava_jax.models.llava import Llava, init_params, tiny_config

IMAGES = os.path.join(TOY_DIR, "images")


def files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_bundle_is_what_the_generator_writes(tmp_path):
    write_toy_world(str(tmp_path))
    assert files(str(tmp_path)) == [f for f in files(TOY_DIR) if f != "README.md"]
    for name in files(str(tmp_path)):
        ours, bundled = tmp_path / name, os.path.join(TOY_DIR, name)
        if name.endswith(".png"):  # compare pixels: PNG bytes may differ across zlib versions
            assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(bundled))), name
        elif name.endswith(".json"):
            with open(bundled) as f:
                assert json.loads(ours.read_text()) == json.load(f), name
        else:
            with open(bundled) as f:
                assert ours.read_text() == f.read(), name


def test_bundle_is_small():
    size = sum(os.path.getsize(os.path.join(TOY_DIR, f)) for f in files(TOY_DIR))
    assert size < 2_000_000, size
    images = [f for f in files(TOY_DIR) if f.endswith(".png")]
    assert len(images) == NUM_TRAIN_IMAGES + NUM_EVAL_IMAGES + NUM_PAIR_IMAGES + NUM_EXTRA_SFT == 1264


def test_tokenizer_fits_the_tiny_model():
    hf = AutoTokenizer.from_pretrained(os.path.join(TOY_DIR, "tokenizer"))
    config = tiny_config()
    assert len(hf) == config.text.vocab_size == 512
    assert hf.convert_tokens_to_ids("<image>") == config.image_token_index == 511
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf("What color is it?").input_ids[0] == hf.bos_token_id  # adds BOS, like LLaMA
    tok = load_tokenizer(os.path.join(TOY_DIR, "tokenizer"))
    world = build_world()
    texts = corpus(world)
    ids = [i for t in texts for i in tok.encode(t)]
    assert 0 not in ids and max(ids) < 511  # no <unk>, never the image id
    short = [t["value"] for r in world["sft"] if r["id"].endswith(("_mc", "_yn")) for t in r["conversations"]]
    assert 0 not in [i for t in short for i in tok.encode(t.replace("<image>", ""))]  # left out of the corpus
    assert tok.decode(tok.encode("There is a red circle in the top left.")) == "There is a red circle in the top left."
    assert 0 not in tok.encode("An unseen word: zebra-crossing 42!")  # every ASCII character has a piece


def test_toy_tokenizer_loads_as_autotokenizer_would_without_torch():
    """The toy tokenizer names the generic class: load_tokenizer builds it directly, the class
    AutoTokenizer picks, with the same ids, and without importing torch (a fresh process)."""
    import subprocess
    import sys

    path = os.path.join(TOY_DIR, "tokenizer")
    auto, tok = AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    assert type(tok.hf) is type(auto) and tok.hf.special_tokens_map == auto.special_tokens_map
    texts = [t["value"] for r in build_world()["sft"][:100] for t in r["conversations"]]
    assert [tok.encode(t) for t in texts] == [auto.encode(t, add_special_tokens=False) for t in texts]
    code = ("import sys; from llava_jax.data import load_tokenizer; "
            f"load_tokenizer({path!r}); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(TOY_DIR)))
    assert done.stdout.split()[-1] == "False", done.stdout + done.stderr[-2000:]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer(os.path.join(TOY_DIR, "tokenizer"))
    return tok, dict(image_folder=IMAGES, **vision_kwargs(tiny_config()))


def path(name):
    return os.path.join(TOY_DIR, name)


def test_every_toy_file_loads_clean(setup):
    tok, kw = setup
    captions = load_captions(path("captions.json"))
    sets = [SFTDataset(path("sft.json"), tok, **kw), SFTDataset(path("pretrain.json"), tok, template="plain", **kw),
            PreferenceDataset(path("preference.json"), tok, captions=captions, **kw),
            RLPromptDataset(path("rl_prompts.json"), tok, captions=captions, **kw),
            EvalDataset(path("eval/pope.jsonl"), tok, **kw), EvalDataset(path("eval/questions.jsonl"), tok, **kw),
            EvalDataset(path("eval/mmhal.json"), tok, **kw), EvalDataset(path("eval/mc.jsonl"), tok, **kw)]
    for dataset in sets:
        examples = [dataset.load(i) for i in range(len(dataset))]
        assert all(e is not None for e in examples) and dataset.report.skipped == {}, dataset.report.summary()
        assert dataset.report.total == len(dataset) > 0
    assert [d.fmt for d in sets[4:]] == ["pope", "vqa", "mmhal", "vqa"]
    pope = sets[4]
    assert set(pope.load(i)["meta"]["question"].label for i in range(len(pope))) == {"yes", "no"}


def test_world_semantics():
    world = build_world()
    types = Counter(r["caption_type"] for r in world["rl_prompts"])
    assert set(types) == {1, 2, 3, 4, 5, 6, 7}
    for r in world["rl_prompts"]:
        if 2 <= r["caption_type"] <= 5:
            assert "aok_" + r["image"] in world["captions"]
    kinds = Counter()
    for p in world["preference"]:  # chosen: every shape, nothing else; rejected: by its kind
        chosen = p[f"output_{p['preference']}"]["value"]
        rejected = p[f"output_{3 - p['preference']}"]["value"]
        truth = scene_objects(world["captions"][p["image"]])
        assert set(named_objects(chosen)) == truth and not hallucinates(chosen, truth), p
        assert hallucinates(rejected, truth) == p["hallucination"], p
        if not p["hallucination"]:  # evasive or incomplete: less than the whole truth
            assert len(named_objects(rejected)) < len(world["scenes"][p["image"]]), p
        kinds[p["kind"]] += 1
    assert set(kinds) == {"embellished", "swapped", "recoloured", "incomplete", "evasive"}, kinds
    assert 0.4 < sum(p["hallucination"] for p in world["preference"]) / len(world["preference"]) < 0.8
    scenes = world["scenes"]
    for q in world["pope"]:  # labels agree with the ground truth
        color, shape = q["text"][len("Is there a "):-len(" in the image?")].split()
        present = any((s, c) == (shape, color) for s, c, _ in scenes[q["image"]])
        assert q["label"] == ("yes" if present else "no")
    short = [r for r in world["sft"] if r["id"].endswith(("_mc", "_yn"))]
    assert len(short) == NUM_EXTRA_SFT and Counter(r["id"][-2:] for r in short) == {"mc": 160, "yn": 160}
    answers = Counter()
    for r in short:  # the short answers are true of their scene
        question, answer = (t["value"] for t in r["conversations"])
        scene = scenes[r["image"]]
        if r["id"].endswith("_mc"):
            place = question.split(" of the image?")[0].split("in the ")[-1]
            options = dict(line.split(". ") for line in question.splitlines()[2:6])  # after "<image>", the question
            assert (options[answer.rstrip(".")], place) in {(s, p) for s, _, p in scene}, r
        else:
            color, shape = question[len("<image>\nIs there a "):-len(" in the image?")].split()
            present = any((s, c) == (shape, color) for s, c, _ in scene)
            assert answer.startswith("Yes, it is in the " if present else f"No, there is no {color} {shape}"), r
        answers[answer.split()[0]] += 1
    assert answers["Yes,"] > 50 and answers["No,"] > 50 and len(answers) == 6, answers  # A.-D., Yes, No
    train = {r["image"] for key in ("sft", "pretrain", "preference", "rl_prompts") for r in world[key] if "image" in r}
    held_out = {q["image"] for key in ("questions", "pope", "mc", "mmhal") for q in world[key]
                for q in [{"image": q.get("image") or q.get("image_path")}]}
    assert len(held_out) == NUM_EVAL_IMAGES and not train & held_out  # eval images are in no training file
    assert Counter(q["label"] for q in world["pope"]) == {"yes": len(world["pope"]) // 2, "no": len(world["pope"]) // 2}
    for q in world["mc"]:  # the letter names the shape in the asked place
        place = q["text"].split(" of the image?")[0].split("in the ")[-1]
        options = dict(line.split(". ") for line in q["text"].splitlines()[1:5])
        assert (options[q["answer"]], place) in {(s, p) for s, _, p in scenes[q["image"]]}, q


def test_sft_descriptions_carry_the_flaw_at_a_controlled_rate():
    """Detailed descriptions name one absent shape EMBELLISH_RATE of the time (the habit the
    SFT policy learns and PPO must unlearn); the other describe prompts are always faithful."""
    world = build_world()
    flawed = Counter()
    for r in world["sft"]:
        if not r["id"].endswith("_d"):
            continue
        prompt, answer = (t["value"] for t in r["conversations"])
        truth = scene_objects(world["captions"][r["image"]])
        assert truth <= set(named_objects(answer)), r  # every shape is always there
        flawed[prompt.split("\n")[-1] in DETAILED, hallucinates(answer, truth)] += 1
    assert flawed[False, True] == 0, flawed
    rate = flawed[True, True] / (flawed[True, True] + flawed[True, False])
    assert abs(rate - EMBELLISH_RATE) < 0.06, rate
    assert all(r["caption_type"] != 1 or r["conversations"][0]["value"].split("\n")[-1] in DETAILED
               for r in world["rl_prompts"])


def test_toy_batch_runs_through_the_tiny_model(setup):
    tok, kw = setup
    loader = Loader(SFTDataset(path("sft.json"), tok, max_length=128, **kw), 4, seed=0, buckets=(128,),
                    process_index=0, process_count=1, num_workers=0)
    batch = next(loader)
    config = tiny_config()
    # Random weights of the right shapes (initialising for real costs seconds of compile).
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    forward = jax.jit(lambda p, ids, pix, mask: Llava(config).apply({"params": p}, ids, pix, mask))
    logits = forward(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                     jnp.asarray(batch["attention_mask"]))
    assert logits.shape == (4, 128, 512) and bool(jnp.isfinite(logits).all())
