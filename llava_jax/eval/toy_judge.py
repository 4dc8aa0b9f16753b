"""An offline hallucination judge for the toy "shapes" world (our stand-in for MMHal-Bench's
GPT-4 judge, which needs a network): the world is fully described by its captions, so an
answer hallucinates when it names a coloured shape, or a shape, that the image lacks.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from llava_jax.data.toy import COLORS, SHAPES

_PAIR = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")
_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")


def scene_objects(captions: Iterable[str]) -> set[tuple[str, str]]:
    """(colour, shape) pairs the captions mention: the image's objects."""
    return {(m.group(1), m.group(2)) for caption in captions for m in _PAIR.finditer(caption.lower())}


def _negated(text: str, start: int) -> bool:
    """"no blue cross", "not a red square": a denial, not a claim."""
    return bool({"no", "not", "without"} & set(text[:start].split()[-3:]))


def hallucinates(answer: str, objects: set[tuple[str, str]]) -> bool:
    """True when the answer claims a coloured shape or a shape that is not in the image."""
    text = answer.lower()
    shapes = {shape for _, shape in objects}
    if any((m.group(1), m.group(2)) not in objects and not _negated(text, m.start()) for m in _PAIR.finditer(text)):
        return True
    return any(m.group(1) not in shapes and not _negated(text, m.start()) for m in _SHAPE.finditer(text))


def named_objects(answer: str) -> list[tuple[str, str]]:
    """The coloured shapes an answer claims (denials left out), in order."""
    text = answer.lower()
    return [(m.group(1), m.group(2)) for m in _PAIR.finditer(text) if not _negated(text, m.start())]


def describe_scores(answers: Sequence[str], captions_per_answer: Sequence[Iterable[str]]) -> dict[str, float]:
    """Hallucination and coverage of descriptions against their images' captions:
    hallucinating_answers (share naming something absent), absent_object_share (of the
    coloured shapes named, the share not in the image), recall (of the shapes in the images,
    the share named with their colour), no_object_share (answers naming no coloured shape)."""
    flags, named, absent, present, found, empty = [], 0, 0, 0, 0, 0
    for answer, captions in zip(answers, captions_per_answer):
        objects = scene_objects(captions)
        claims = set(named_objects(answer))
        flags.append(hallucinates(answer, objects))
        named += len(claims)
        absent += len(claims - objects)
        present += len(objects)
        found += len(claims & objects)
        empty += not claims
    n = max(len(flags), 1)
    return {"hallucinating_answers": sum(flags) / n, "absent_object_share": absent / max(named, 1),
            "recall": found / max(present, 1), "no_object_share": empty / n, "n": len(flags)}
