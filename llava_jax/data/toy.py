"""The bundled toy "shapes" world: the embedded default data the tiny configs train on.

Images (56x56 PNG) hold one to three coloured shapes, each in its own quadrant. Because the
ground truth is known, every stage has data with no downloads, and hallucination is
measurable: the preference pairs' rejected answers rename every shape with a colour or a
shape that is nowhere in the image, and the POPE-style eval asks about present and absent
shapes.

`write_toy_world(out_dir)` (run by `tools/make_toy_data.py`) writes, deterministically:

  images/shapes_XXX.png   96 images (the last 16 are held out for evaluation)
  images/pair_XXX.png     400 images, one preference pair each (in no other file)
  images/extra_XXX.png    320 images, one SFT description each (more scenes to learn to see)
                          and one short answer each (multiple choice or yes/no, alternating)
  captions.json           image -> ground-truth captions (shapes_ and pair_ images);
                          "aok_" + image -> MC rationales
  pretrain.json           stage-1 (`plain`) image-caption pairs
  sft.json                LLaVA conversations (single and multi-turn, some text-only)
  preference.json         output_1 / output_2 / preference / hallucination
  rl_prompts.json         caption_type 1 (describe), 2-5 (multiple choice), 6/7 (yes/no)
  eval/questions.jsonl    model_vqa questions   eval/pope.jsonl  + labels
  eval/mmhal.json         MMHal-Bench-style items
  tokenizer/              BPE tokenizer (HF format): <unk>=0 <s>=1 </s>=2 <pad>=3, 512 ids,
                          <image>=511 (= tiny_config().image_token_index)
"""
from __future__ import annotations

import json
import os
import random
import string
from typing import Iterable

from PIL import Image, ImageDraw

TOY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "toy")
IMAGE_SIZE, NUM_IMAGES, NUM_EVAL = 56, 96, 16
NUM_PAIR_IMAGES = 400  # images "pair_XXX.png" of the preference pairs (one pair each)
NUM_EXTRA_SFT = 320  # images "extra_XXX.png" with one SFT description each (grounding on more scenes)
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 30)}
PLACES = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (200, 200, 200)
NUMBERS = ("zero", "one", "two", "three")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
DESCRIBE = ("Describe the image.", "What do you see in this picture?", "Describe the image in detail.",
            "What shapes are in the image?")
# Words the reward-model prompt and tests are likely to use, so the toy tokenizer has pieces for them.
EXTRA_TEXT = ("Please evaluate the quality of your last response. The response should be accurate, helpful, "
              "natural language and concise. Accurate: the response must be supported by the following "
              "captions of the image. Helpful: it answers the question. Concise: it is short and clear. "
              "Based on the criteria, the quality score of my last response is")


def _scene(rng: random.Random) -> list[tuple[str, str, str]]:
    places = rng.sample(PLACES, rng.randint(1, 3))
    return [(rng.choice(SHAPES), rng.choice(list(COLORS)), p) for p in sorted(places, key=PLACES.index)]


def _draw(scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half, r = IMAGE_SIZE // 2, 9
    for shape, color, place in scene:
        cx = half // 2 + (half if "right" in place else 0)
        cy = half // 2 + (half if "bottom" in place else 0)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.rectangle((cx - r, cy - 3, cx + r, cy + 3), fill=fill)
            draw.rectangle((cx - 3, cy - r, cx + 3, cy + r), fill=fill)
    return image


def _obj(o) -> str:
    return f"a {o[1]} {o[0]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _describe(scene) -> str:
    return "There is " + _join([f"{_obj(o)} in the {o[2]}" for o in scene]) + "."


def _captions(scene) -> list[str]:
    n = NUMBERS[len(scene)]
    return [_describe(scene),
            f"The image shows {n} shape{'s' if len(scene) > 1 else ''} on a grey background.",
            "A picture of " + _join([_obj(o) for o in scene]) + ".",
            " ".join(f"The {o[0]} in the {o[2]} is {o[1]}." for o in scene),
            f"{n.capitalize()} simple coloured shape{'s' if len(scene) > 1 else ''}."]


def _absent(scene, rng: random.Random) -> tuple[str, str]:
    present = {(o[0], o[1]) for o in scene}
    options = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
    return rng.choice(options)


def _hallucinate(scene, rng: random.Random) -> str:
    """A description with one wrong colour, or with an extra shape that is not there (the
    first release's rejected answers; now only drawn to keep the other records as they were)."""
    scene = list(scene)
    free = [p for p in PLACES if p not in {o[2] for o in scene}]
    if free and rng.random() < 0.5:
        shape, color = _absent(scene, rng)
        scene.append((shape, color, rng.choice(free)))
        scene.sort(key=lambda o: PLACES.index(o[2]))
    else:
        k = rng.randrange(len(scene))
        wrong = rng.choice([c for c in COLORS if c != scene[k][1]])
        scene[k] = (scene[k][0], wrong, scene[k][2])
    return _describe(scene)


def _hallucinated(scene, rng: random.Random) -> str:
    """A hallucinated description: the true layout, but every shape renamed with a colour and
    a shape that are nowhere in the image (so nowhere in its captions); with three shapes of
    three colours only one of the two may be missing, then either is."""
    colors, shapes = {o[1] for o in scene}, {o[0] for o in scene}
    options = [(s, c) for s in SHAPES for c in COLORS if s not in shapes and c not in colors]
    options = options or [(s, c) for s in SHAPES for c in COLORS if s not in shapes or c not in colors]
    return _describe([(*rng.choice(options), place) for _, _, place in scene])


def _preference(pid: str, name: str, scene, rng: random.Random, bad: str) -> dict:
    good = _describe(scene)
    preference = rng.choice((1, 2))
    outputs = (good, bad) if preference == 1 else (bad, good)
    return {"id": pid, "image": name, "conversations": _conv(f"<image>\n{rng.choice(DESCRIBE)}", ""),
            "output_1": {"from": "gpt", "value": outputs[0]}, "output_2": {"from": "gpt", "value": outputs[1]},
            "preference": preference, "hallucination": True}


def _conv(*pairs: str) -> list[dict]:
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(pairs)]


def _qa(rid: str, name: str, scene, rng: random.Random) -> dict:
    """A 3-turn conversation about one shape: its colour, its place, the count."""
    shape, color, place = rng.choice(scene)
    return {"id": rid, "image": name, "conversations": _conv(
        f"What color is the {shape}?\n<image>", f"The {shape} is {color}.",
        f"Where is the {shape}?", f"It is in the {place} of the image.",
        "How many shapes are there?", f"There {'is' if len(scene) == 1 else 'are'} {NUMBERS[len(scene)]}.")}


def _mc(scene, rng: random.Random):
    """(question, caption_type, rationale) for a multiple-choice item about one shape."""
    shape, color, place = rng.choice(scene)
    options = list(SHAPES)
    rng.shuffle(options)
    letter = "ABCD"[options.index(shape)]
    lines = "\n".join(f"{L}. {o}" for L, o in zip("ABCD", options))
    question = f"What shape is in the {place} of the image?\n{lines}\n{MC_SUFFIX}"
    rationale = f"The shape in the {place} is a {color} {shape}, so the answer is {letter}."
    return question, 2 + "ABCD".index(letter), rationale


def _short_answer(rid: str, name: str, scene, rng: random.Random, multiple_choice: bool) -> dict:
    """A multiple-choice item answered with its letter ("B."), or a yes/no question about a
    present or an absent shape (half each) answered "Yes, ..." / "No, ..."."""
    if multiple_choice:
        question, ctype, _ = _mc(scene, rng)
        answer = f"{'ABCD'[ctype - 2]}."
    elif rng.random() < 0.5:
        shape, color = _absent(scene, rng)
        question, answer = f"Is there a {color} {shape} in the image?", f"No, there is no {color} {shape}."
    else:
        shape, color, place = rng.choice(scene)
        question, answer = f"Is there a {color} {shape} in the image?", f"Yes, it is in the {place}."
    return {"id": rid, "image": name, "conversations": _conv(f"<image>\n{question}", answer)}


def build_world(seed: int = 0) -> dict:
    """All toy records and images, in memory (deterministic for a seed)."""
    rng = random.Random(seed)
    scenes = [_scene(rng) for _ in range(NUM_IMAGES)]
    names = [f"shapes_{i:03d}.png" for i in range(NUM_IMAGES)]
    train = range(NUM_IMAGES - NUM_EVAL)
    captions, pretrain, sft, pref, rl = {}, [], [], [], []
    for i, (name, scene) in enumerate(zip(names, scenes)):
        captions[name] = _captions(scene)
        if i not in train:
            continue
        pretrain.append({"id": f"pre_{i}", "image": name, "conversations": _conv("<image>", captions[name][2])})
        sft.append({"id": f"sft_{i}_d", "image": name,
                    "conversations": _conv(f"<image>\n{rng.choice(DESCRIBE)}", _describe(scene))})
        sft.append(_qa(f"sft_{i}_q", name, scene, rng))
        # The first release drew a preference pair on each training image here; the draws stay
        # so that every record after them keeps its content (the pairs have their own images).
        _hallucinate(scene, rng), rng.choice((1, 2)), rng.choice(DESCRIBE)
        kind = i % 3
        if kind == 0:
            rl.append({"id": f"rl_{i}", "image": name, "caption_type": 1, "length_bonus": 1.0,
                       "conversations": _conv(f"<image>\n{rng.choice(DESCRIBE)}", "")})
        elif kind == 1:
            question, ctype, rationale = _mc(scene, rng)
            captions["aok_" + name] = [rationale]
            rl.append({"id": f"rl_{i}", "image": name, "caption_type": ctype,
                       "conversations": _conv(f"<image>\n{question}", "")})
        else:
            if rng.random() < 0.5:
                (shape, color), ctype = _absent(scene, rng), 6
            else:
                shape, color, _ = rng.choice(scene)
                ctype = 7
            rl.append({"id": f"rl_{i}", "image": name, "caption_type": ctype,
                       "conversations": _conv(f"<image>\nIs there a {color} {shape} in the image?", "")})
    text_only = [("How many sides does a triangle have?", "A triangle has three sides."),
                 ("How many sides does a square have?", "A square has four sides."),
                 ("What color do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
                 ("Is a circle round?", "Yes, a circle is round.")]
    sft += [{"id": f"text_{k}", "conversations": _conv(q, a)} for k, (q, a) in enumerate(text_only)]
    questions, pope, mmhal = [], [], []
    for i in range(NUM_IMAGES - NUM_EVAL, NUM_IMAGES):
        name, scene = names[i], scenes[i]
        questions.append({"question_id": len(questions), "image": name, "text": rng.choice(DESCRIBE)})
        asks = [(o[0], o[1], "yes") for o in rng.sample(scene, min(2, len(scene)))]
        while len(asks) < 4:
            shape, color = _absent(scene + [(s, c, "") for s, c, _ in asks], rng)
            asks.append((shape, color, "no"))
        for shape, color, label in asks:
            pope.append({"question_id": len(pope), "image": name, "text": f"Is there a {color} {shape} in the image?",
                         "label": label})
        shape, color, place = rng.choice(scene)
        mmhal.append({"question_type": "attribute", "question_topic": "shapes", "image_id": name,
                      "image_path": name, "image_content": [o[0] for o in scene],
                      "question": f"What color is the {shape} in the {place}?",
                      "gt_answer": f"The {shape} in the {place} is {color}."})
    # Preference pairs on images of their own, from their own stream: no pair shares an image
    # with another pair or with SFT, so a held-out pair is a new scene for the reward model.
    pair_rng = random.Random(f"pairs-{seed}")
    for k in range(NUM_PAIR_IMAGES):
        name, scene = f"pair_{k:03d}.png", _scene(pair_rng)
        names.append(name)
        scenes.append(scene)
        captions[name] = _captions(scene)
        pref.append(_preference(f"pair_{k}", name, scene, pair_rng, _hallucinated(scene, pair_rng)))
    # More SFT scenes, also from their own stream: a description each. Eighty images teach the
    # tiny model to recite them; a few hundred more teach it to see colours and shapes in
    # scenes it has not met, which the reward model then builds on.
    sft_rng = random.Random(f"sft-{seed}")
    for k in range(NUM_EXTRA_SFT):
        name, scene = f"extra_{k:03d}.png", _scene(sft_rng)
        names.append(name)
        scenes.append(scene)
        sft.append({"id": f"extra_{k}_d", "image": name,
                    "conversations": _conv(f"<image>\n{sft_rng.choice(DESCRIBE)}", _describe(scene))})
    # Short answers in the RL prompts' question forms (multiple choice, yes/no) on the extra
    # scenes, from their own stream: without them the SFT policy never answers with a letter or
    # a "No", and PPO's correctness term has nothing to reinforce.
    qa_rng, scene_of = random.Random(f"sft-qa-{seed}"), dict(zip(names, scenes))
    for k in range(NUM_EXTRA_SFT):
        name = f"extra_{k:03d}.png"
        sft.append(_short_answer(f"extra_{k}_{'mc' if k % 2 == 0 else 'yn'}", name, scene_of[name],
                                 qa_rng, multiple_choice=k % 2 == 0))
    return {"scenes": scene_of, "captions": captions, "pretrain": pretrain, "sft": sft,
            "preference": pref, "rl_prompts": rl, "questions": questions, "pope": pope, "mmhal": mmhal}


def corpus(world: dict) -> list[str]:
    """Every text of the world (plus template and reward-prompt words): the tokenizer corpus."""
    from llava_jax.data.templates import VICUNA_SYSTEM
    from llava_jax.reward_prompt import RewardPrompt

    # The template and the default reward-model wording occur in every sequence of their
    # stages: weight them so they become (mostly) whole-word tokens and sequences stay short.
    reward = RewardPrompt.from_file()
    rating = reward.user.replace("{facts}", reward.facts.replace("{captions}", "")) + " " + reward.assistant
    texts = [EXTRA_TEXT, string.ascii_letters + string.digits] + [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 200
    texts += [rating] * 100 + [MC_SUFFIX] * 100  # every multiple-choice RL prompt ends with it
    # The pairs (on pair_ images) and the short answers (ids *_mc, *_yn) repeat sentence forms
    # found elsewhere: leaving them out keeps the tokenizer the same whatever their number.
    texts += [c for name, caps in world["captions"].items() for c in caps if not name.startswith("pair_")]
    for key in ("pretrain", "sft", "preference", "rl_prompts"):
        for record in world[key]:
            if record.get("image", "").startswith("pair_") or record["id"].endswith(("_mc", "_yn")):
                continue
            texts += [t["value"] for t in record["conversations"]]
            texts += [record[k]["value"] for k in ("output_1", "output_2") if k in record]
    texts += [q["text"] for q in world["questions"] + world["pope"]]
    texts += [m["question"] + " " + m["gt_answer"] for m in world["mmhal"]]
    # "<image>" is never tokenised as text (the loader inserts placeholder ids), and BPE must
    # not learn it as a word: it is a special token at the last id.
    return [t.replace("<image>", "") for t in texts]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, image_token: str = "<image>"):
    """A BPE tokenizer trained in-process (no downloads), LLaMA-like: Metaspace "▁" word
    prefix, BOS added by default, <unk>=0 <s>=1 </s>=2 <pad>=3, every printable ASCII
    character in the alphabet (unseen words still encode), `image_token` at id vocab_size-1
    (reserved fillers pad the gap if training finds fewer merges). Returns a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fillers = [f"<reserved_{k}>" for k in range(vocab_size - 1 - tok.get_vocab_size())]
    tok.add_special_tokens(fillers + [image_token])
    if tok.token_to_id(image_token) != vocab_size - 1:
        raise RuntimeError("could not place the image token at the last id")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=[image_token])


def _dump(path: str, obj, jsonl: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in obj)
        else:
            json.dump(obj, f, indent=1)
            f.write("\n")


def write_toy_world(out_dir: str = TOY_DIR, seed: int = 0) -> dict:
    """Writes the toy world under `out_dir` (see the module docstring); returns it in memory."""
    world = build_world(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for name, scene in world["scenes"].items():
        _draw(scene).save(os.path.join(out_dir, "images", name), optimize=True)
    for key in ("captions", "pretrain", "sft", "preference", "rl_prompts"):
        _dump(os.path.join(out_dir, f"{key}.json"), world[key])
    _dump(os.path.join(out_dir, "eval", "questions.jsonl"), world["questions"], jsonl=True)
    _dump(os.path.join(out_dir, "eval", "pope.jsonl"), world["pope"], jsonl=True)
    _dump(os.path.join(out_dir, "eval", "mmhal.json"), world["mmhal"])
    build_tokenizer(corpus(world)).save_pretrained(os.path.join(out_dir, "tokenizer"))
    return world
