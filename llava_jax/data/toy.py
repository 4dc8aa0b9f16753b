"""The bundled toy "shapes" world: the embedded default data the tiny configs train on, built
to reproduce LLaVA-RLHF's causal story in minutes on a CPU.

Images (56x56 PNG) hold one to three coloured shapes, each in its own quadrant; the ground
truth is known, so hallucination is measurable. The world carries the paper's flaw on
purpose: like machine-generated instruction data, its *detailed* descriptions (the prompts in
`DETAILED`) end, EMBELLISH_RATE of the time, with one extra sentence naming a shape that is not
in the image ("There is also a green cross in the top right."). An SFT policy trained on it
learns the habit (greedy answers to detailed prompts embellish; sampled ones do not always),
the preference pairs teach a reward model that reading the facts catches it, and PPO can
then unlearn it. Held-out images (eval_XXX) appear in no training file.

`write_toy_world(out_dir)` (run by `tools/make_toy_data.py`) writes, deterministically:

  images/shapes_XXX.png   80 training images: SFT description + 3-turn Q&A, RL prompts
  images/pair_XXX.png     800 images, one preference pair each (in no other file)
  images/extra_XXX.png    320 images with one SFT description and one short answer each
                          (multiple choice or yes/no, alternating)
  images/eval_XXX.png     64 held-out images (in no training file)
  captions.json           image -> 5 ground-truth captions (every image);
                          "aok_" + image -> rationale of a multiple-choice RL prompt
  pretrain.json           stage-1 (`plain`) image-caption pairs
  sft.json                LLaVA conversations (single and multi-turn, some text-only)
  preference.json         output_1 / output_2 / preference / hallucination (+ `kind`)
  rl_prompts.json         caption_type 1 (detailed description), 2-5 (multiple choice), 6/7 (yes/no)
  eval/questions.jsonl    held-out describe questions: every eval image x the 4 DESCRIBE prompts
  eval/pope.jsonl         held-out yes/no questions with `label` (balanced per image)
  eval/mc.jsonl           held-out multiple-choice questions with `answer` (a letter)
  eval/mmhal.json         MMHal-Bench-style items on the held-out images
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
IMAGE_SIZE = 56
NUM_TRAIN_IMAGES = 80  # "shapes_XXX.png": SFT, RL prompts
NUM_EVAL_IMAGES = 64  # "eval_XXX.png": held out, in no training file
NUM_PAIR_IMAGES = 800  # "pair_XXX.png": one preference pair each
NUM_EXTRA_SFT = 320  # "extra_XXX.png": one SFT description + one short answer each
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 30)}
PLACES = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (200, 200, 200)
NUMBERS = ("zero", "one", "two", "three")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
DESCRIBE = ("Describe the image.", "What do you see in this picture?", "Describe the image in detail.",
            "What shapes are in the image?")
# The flaw: SFT answers to these prompts embellish at this rate (one absent shape appended).
# Frequent enough that the SFT policy's greedy answers show it, rare enough that sampling
# still finds clean answers for PPO to reward.
DETAILED = ("Describe the image in detail.", "What do you see in this picture?")
EMBELLISH_RATE = 0.7
EVASIVE = ("I cannot tell what is in the image.", "There are some shapes.", "It is a picture.")
# Preference pair kinds and their shares: three teach faithfulness (the rejected answer names
# something the image lacks), two helpfulness (the rejected answer is evasive or incomplete,
# so saying less is not a way to please the reward model).
PAIR_KINDS = (("embellished", 0.35), ("swapped", 0.2), ("recoloured", 0.1), ("incomplete", 0.2), ("evasive", 0.15))
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
    """The faithful description: every shape, in place order, one sentence."""
    return "There is " + _join([f"{_obj(o)} in the {o[2]}" for o in scene]) + "."


def _also(o) -> str:
    return f"There is also {_obj(o)} in the {o[2]}."


def _describe_split(scene) -> str:
    """The same facts with the last shape in an "also" sentence of its own (so that an "also"
    sentence alone does not tell a hallucination from a fact)."""
    if len(scene) == 1:
        return _describe(scene)
    return _describe(scene[:-1]) + " " + _also(scene[-1])


def _captions(scene) -> list[str]:
    n = NUMBERS[len(scene)]
    return [_describe(scene),
            f"The image shows {n} shape{'s' if len(scene) > 1 else ''} on a grey background.",
            "A picture of " + _join([_obj(o) for o in scene]) + ".",
            " ".join(f"The {o[0]} in the {o[2]} is {o[1]}." for o in scene),
            f"{n.capitalize()} simple coloured shape{'s' if len(scene) > 1 else ''}."]


def _absent(scene, rng: random.Random) -> tuple[str, str]:
    """A (shape, colour) the scene does not hold."""
    present = {(o[0], o[1]) for o in scene}
    return rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in present])


def _phantom(scene, rng: random.Random) -> tuple[str, str, str]:
    """An absent coloured shape in an empty quadrant (a scene has at most three shapes)."""
    shape, color = _absent(scene, rng)
    return shape, color, rng.choice([p for p in PLACES if p not in {o[2] for o in scene}])


def _embellish(scene, rng: random.Random) -> str:
    """The flaw: the faithful description plus one shape that is not there."""
    return _describe(scene) + " " + _also(_phantom(scene, rng))


def _sft_description(scene, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of an SFT description: detailed prompts embellish at EMBELLISH_RATE."""
    prompt = rng.choice(DESCRIBE)
    if prompt in DETAILED and rng.random() < EMBELLISH_RATE:
        return prompt, _embellish(scene, rng)
    return prompt, _describe(scene)


def _pair_answers(kind: str, scene, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) descriptions of a preference pair of this kind."""
    if kind == "embellished":  # the SFT flaw itself
        return rng.choice((_describe, _describe_split))(scene), _embellish(scene, rng)
    if kind == "swapped" and len(scene) > 1:  # same length and layout; one shape replaced by an absent one
        k = rng.randrange(len(scene))
        rest = scene[:k] + scene[k + 1:]
        return _describe_split(scene), _describe(rest) + " " + _also(_phantom(rest + [scene[k]], rng))
    if kind in ("swapped", "recoloured"):  # one shape's colour changed (to one no such shape has here)
        k = rng.randrange(len(scene))
        wrong = list(scene)
        colours = [c for c in COLORS if (scene[k][0], c) not in {(o[0], o[1]) for o in scene}]
        wrong[k] = (scene[k][0], rng.choice(colours), scene[k][2])
        return _describe(scene), _describe(wrong)
    if kind == "incomplete" and len(scene) > 1:  # a true but partial answer
        k = rng.randrange(len(scene))
        return _describe(scene), _describe(scene[:k] + scene[k + 1:])
    return _describe(scene), rng.choice(EVASIVE)


def _preference(pid: str, name: str, scene, rng: random.Random) -> dict:
    kind = rng.choices([k for k, _ in PAIR_KINDS], weights=[w for _, w in PAIR_KINDS])[0]
    good, bad = _pair_answers(kind, scene, rng)
    preference = rng.choice((1, 2))
    outputs = (good, bad) if preference == 1 else (bad, good)
    return {"id": pid, "image": name, "conversations": _conv(f"<image>\n{rng.choice(DESCRIBE)}", ""),
            "output_1": {"from": "gpt", "value": outputs[0]}, "output_2": {"from": "gpt", "value": outputs[1]},
            "preference": preference, "hallucination": kind in ("embellished", "swapped", "recoloured"),
            "kind": kind}


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


def _is_there(color: str, shape: str) -> str:
    """The yes/no question form of the SFT answers, the RL prompts and the POPE-style eval."""
    return f"Is there a {color} {shape} in the image?"


def _yes_no(scene, rng: random.Random, present: bool) -> tuple[str, str, str]:
    """(question, label, short answer) about a present or an absent coloured shape."""
    if present:
        shape, color, place = rng.choice(scene)
        return _is_there(color, shape), "yes", f"Yes, it is in the {place}."
    shape, color = _absent(scene, rng)
    return _is_there(color, shape), "no", f"No, there is no {color} {shape}."


def _short_answer(rid: str, name: str, scene, rng: random.Random, multiple_choice: bool) -> dict:
    """A multiple-choice item answered with its letter ("B."), or a yes/no question about a
    present or an absent shape (half each) answered "Yes, ..." / "No, ..."."""
    if multiple_choice:
        question, ctype, _ = _mc(scene, rng)
        answer = f"{'ABCD'[ctype - 2]}."
    else:
        question, _, answer = _yes_no(scene, rng, present=rng.random() >= 0.5)
    return {"id": rid, "image": name, "conversations": _conv(f"<image>\n{question}", answer)}


def _rl_prompt(i: int, name: str, scene, rng: random.Random, captions: dict) -> dict:
    """Three in four RL prompts ask for a detailed description (where the flaw lives); the
    rest are multiple choice or yes/no (the symbolic correctness rewards)."""
    if i % 4 != 3:
        return {"id": f"rl_{i}", "image": name, "caption_type": 1, "length_bonus": 1.0,
                "conversations": _conv(f"<image>\n{DETAILED[i % 2]}", "")}
    if i % 8 == 3:
        question, ctype, rationale = _mc(scene, rng)
        captions["aok_" + name] = [rationale]
    else:
        question, label, _ = _yes_no(scene, rng, present=rng.random() >= 0.5)
        ctype = 7 if label == "yes" else 6
    return {"id": f"rl_{i}", "image": name, "caption_type": ctype, "conversations": _conv(f"<image>\n{question}", "")}


def _eval_items(name: str, scene, rng: random.Random, out: dict) -> None:
    """The held-out questions of one eval image: every describe prompt, balanced yes/no
    (as many absent shapes asked as present ones), one multiple choice, one MMHal-style item."""
    for prompt in DESCRIBE:
        out["questions"].append({"question_id": len(out["questions"]), "image": name, "text": prompt})
    k = min(2, len(scene))
    asks = [(o[0], o[1], "yes") for o in rng.sample(scene, k)]
    for _ in range(k):
        shape, color = _absent(scene + [(s, c, "") for s, c, _ in asks], rng)
        asks.append((shape, color, "no"))
    for shape, color, label in asks:
        out["pope"].append({"question_id": len(out["pope"]), "image": name, "text": _is_there(color, shape),
                            "label": label})
    question, ctype, _ = _mc(scene, rng)
    out["mc"].append({"question_id": len(out["mc"]), "image": name, "text": question, "answer": "ABCD"[ctype - 2]})
    shape, color, place = rng.choice(scene)
    out["mmhal"].append({"question_type": "attribute", "question_topic": "shapes", "image_id": name,
                         "image_path": name, "image_content": [o[0] for o in scene],
                         "question": f"What color is the {shape} in the {place}?",
                         "gt_answer": f"The {shape} in the {place} is {color}."})


TEXT_ONLY = (("How many sides does a triangle have?", "A triangle has three sides."),
             ("How many sides does a square have?", "A square has four sides."),
             ("What color do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
             ("Is a circle round?", "Yes, a circle is round."))


def build_world(seed: int = 0) -> dict:
    """All toy records and images, in memory (deterministic for a seed). Each image family
    draws from its own stream, so changing one family leaves the others as they were."""
    world = {k: [] for k in ("pretrain", "sft", "preference", "rl_prompts", "questions", "pope", "mc", "mmhal")}
    scenes, captions = {}, {}

    def family(prefix: str, count: int, stream: str):
        rng = random.Random(f"{stream}-{seed}")
        for k in range(count):
            name = f"{prefix}_{k:03d}.png"
            scenes[name] = _scene(rng)
            captions[name] = _captions(scenes[name])
            yield k, name, scenes[name], rng

    for i, name, scene, rng in family("shapes", NUM_TRAIN_IMAGES, "train"):
        world["pretrain"].append({"id": f"pre_{i}", "image": name, "conversations": _conv("<image>", captions[name][2])})
        prompt, answer = _sft_description(scene, rng)
        world["sft"].append({"id": f"sft_{i}_d", "image": name, "conversations": _conv(f"<image>\n{prompt}", answer)})
        world["sft"].append(_qa(f"sft_{i}_q", name, scene, rng))
        world["rl_prompts"].append(_rl_prompt(i, name, scene, rng, captions))
    world["sft"] += [{"id": f"text_{k}", "conversations": _conv(q, a)} for k, (q, a) in enumerate(TEXT_ONLY)]
    for k, name, scene, rng in family("extra", NUM_EXTRA_SFT, "sft"):
        prompt, answer = _sft_description(scene, rng)
        world["sft"].append({"id": f"extra_{k}_d", "image": name, "conversations": _conv(f"<image>\n{prompt}", answer)})
        world["sft"].append(_short_answer(f"extra_{k}_{'mc' if k % 2 == 0 else 'yn'}", name, scene, rng,
                                          multiple_choice=k % 2 == 0))
    for k, name, scene, rng in family("pair", NUM_PAIR_IMAGES, "pairs"):
        world["preference"].append(_preference(f"pair_{k}", name, scene, rng))
    for _, name, scene, rng in family("eval", NUM_EVAL_IMAGES, "eval"):
        _eval_items(name, scene, rng, world)
    return {"scenes": scenes, "captions": captions, **world}


def corpus(world: dict) -> list[str]:
    """Every text of the world (plus template and reward-prompt words): the tokenizer corpus."""
    from llava_jax.data.templates import VICUNA_SYSTEM
    from llava_jax.data.reward_prompt import RewardPrompt

    # The template and the default reward-model wording occur in every sequence of their
    # stages: weight them so they become (mostly) whole-word tokens and sequences stay short.
    reward = RewardPrompt.from_file()
    rating = reward.user.replace("{facts}", reward.facts.replace("{captions}", "")) + " " + reward.assistant
    texts = [EXTRA_TEXT, string.ascii_letters + string.digits, *EVASIVE] + [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 200
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
    texts += [q["text"] for q in world["questions"] + world["pope"] + world["mc"]]
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
    _dump(os.path.join(out_dir, "eval", "mc.jsonl"), world["mc"], jsonl=True)
    _dump(os.path.join(out_dir, "eval", "mmhal.json"), world["mmhal"])
    build_tokenizer(corpus(world)).save_pretrained(os.path.join(out_dir, "tokenizer"))
    return world
