"""Conversation templates: turns -> token ids with image placeholders and a loss mask.

Three built-in templates, plus `register_template` for more:

* `vicuna_v1` (LLaVA-RLHF's training default, LLaVA's "v1"): the text it stands for is
  ``SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>``.
* `llava_v1` (the default of LLaVA's and LLaVA-RLHF's evaluation scripts): the same layout
  with LLaVA's own system line ("... a curious human ...").
* `plain` (stage-1 feature alignment): ``<image>A1\\n``; the user text is ignored.

The ids are built piece by piece: BOS, text pieces, `num_image_tokens` copies of
`image_token_index` where `<image>` stands, and an EOS id for each `</s>`. This is the layout
LLaVA's `preprocess_v1` masking logic assumes (it counts each round as tokenised on its own),
and for LLaMA tokenizers it gives the ids LLaVA's `tokenizer_image_token` gives: the text
before the image keeps its trailing "▁", the text after it starts with "▁\\n". An assistant
answer is encoded on its own, the space after "ASSISTANT:" becoming the tokenizer's word
prefix. Loss targets (`Encoded.targets`) are exactly the answer tokens and each answer's EOS;
BOS, system line, user turns, role names and image placeholders are never targets.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from llava_jax.data.tokenizer import TextTokenizer

IGNORE_INDEX = -100  # label value of non-target positions (HF convention)
IMAGE_PLACEHOLDER = "<image>"
USER, ASSISTANT = "user", "assistant"
_ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # USER or ASSISTANT
    text: str


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation format. style "two": system + sep, "ROLE: text" turns, `sep` after user
    turns and `</s>` (EOS) after assistant turns. style "plain": image then answer + "\\n"."""

    name: str
    style: str = "two"
    system: str = VICUNA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    plain_sep: str = "\n"


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids (int32 [L]), loss targets (bool [L]) and where the image placeholders are."""

    ids: np.ndarray
    targets: np.ndarray
    image_span: tuple[int, int] | None = None  # [start, end) of the placeholders
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """ids where a target, else IGNORE_INDEX (unshifted, aligned with `ids`)."""
        return np.where(self.targets, self.ids, IGNORE_INDEX).astype(np.int32)


_REGISTRY: dict[str, Template] = {}


def register_template(template: Template, *aliases: str) -> Template:
    """Adds a template (and optional alias names) to the registry."""
    if template.style not in ("two", "plain"):
        raise ValueError(f"unknown template style {template.style!r}")
    for name in (template.name, *aliases):
        _REGISTRY[name] = template
    return template


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in _REGISTRY:
        raise KeyError(f"unknown conversation template {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


register_template(Template("vicuna_v1"), "v1")
# LLaVA's conv_llava_v1: vicuna_v1's layout with its own system line; the default of
# LLaVA's and LLaVA-RLHF's evaluation scripts (model_vqa*.py --conv-mode).
register_template(Template("llava_v1", system=LLAVA_SYSTEM))
register_template(Template("plain", style="plain", system=""))
# The names a config's data.template may take (settings.Template); templates registered later
# serve code that builds a Template itself.
BUILTIN_TEMPLATES = tuple(_REGISTRY)


class ConversationError(ValueError):
    """A conversation that cannot be encoded; `reason` is a bad-input counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def normalize_turns(conversation: Iterable[Mapping]) -> list[Turn]:
    """LLaVA `[{from, value}, ...]` -> alternating user/assistant `Turn`s, `<image>` removed
    (and, as LLaVA, whitespace stripped from that turn only; every other turn kept as written).

    As LLaVA does, a leading assistant turn is dropped. Raises ConversationError
    (reason "empty_conversation", "missing_field" or "bad_roles")."""
    turns = []
    for k, msg in enumerate(conversation):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("value"), str) or "from" not in msg:
            raise ConversationError("missing_field", f"turn {k} needs string fields 'from' and 'value'")
        role = _ROLE_ALIASES.get(str(msg["from"]).lower())
        if role is None:
            raise ConversationError("bad_roles", f"turn {k} has unknown role {msg['from']!r}")
        text = msg["value"]
        if IMAGE_PLACEHOLDER in text:  # as LLaVA's preprocess_multimodal: only the image turn is stripped
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        turns.append(Turn(role, text))
    if turns and turns[0].role == ASSISTANT:
        turns = turns[1:]
    if not turns:
        raise ConversationError("empty_conversation", "conversation has no turns")
    for k, turn in enumerate(turns):
        if turn.role != (USER, ASSISTANT)[k % 2]:
            raise ConversationError("bad_roles", f"roles do not alternate at turn {k}")
    return turns


def user_turn_text(text: str, template: str | Template = "vicuna_v1") -> str:
    """A later user turn as its template writes it, up to the assistant's role ("USER: text
    ASSISTANT:"): the piece `encode_prompt` encodes after an assistant's `</s>`."""
    template = get_template(template)
    return f"{template.roles[0]}: {text}{template.sep}{template.roles[1]}:"


def _pieces(turns: Sequence[Turn], template: Template, has_image: bool, generation: bool):
    """Yields (kind, text, is_target) with kind in bos | text | image | eos."""
    yield "bos", "", False
    if template.style == "plain":
        if has_image:
            yield "image", "", False
        answer = next((t.text for t in turns if t.role == ASSISTANT), None)
        if not generation and answer is not None:
            yield "text", answer + template.plain_sep, True
        return
    user_role, bot_role = template.roles
    text = template.system + template.sep if template.system else ""
    for k, turn in enumerate(turns):
        if turn.role == USER:
            text += f"{user_role}: "
            if k == 0 and has_image:
                yield "text", text, False
                yield "image", "", False
                text = "\n"
            text += turn.text + template.sep + f"{bot_role}:"
        else:
            yield "text", text, False
            text = ""
            if turn.text:
                yield "text", turn.text, True
            yield "eos", "", True
    if text and generation:
        # The prompt ends with "ASSISTANT:"; in training a trailing user turn has nothing to
        # learn from and is left out.
        yield "text", text, False


def _encode(turns, tokenizer, template, num_image_tokens, image_token_index, generation) -> Encoded:
    template = get_template(template)
    has_image = num_image_tokens > 0
    ids: list[int] = []
    targets: list[bool] = []
    span = None
    for kind, text, is_target in _pieces(turns, template, has_image, generation):
        if kind == "bos":
            piece = [tokenizer.bos_id]
        elif kind == "eos":
            piece = [tokenizer.eos_id]
        elif kind == "image":
            span = (len(ids), len(ids) + num_image_tokens)
            piece = [image_token_index] * num_image_tokens
        else:
            piece = tokenizer.encode(text)
        ids.extend(piece)
        targets.extend([is_target] * len(piece))
    return Encoded(np.asarray(ids, np.int32), np.asarray(targets, bool), span)


def encode_conversation(turns: Sequence[Turn], tokenizer: TextTokenizer, template: str | Template = "vicuna_v1",
                        *, num_image_tokens: int = 0, image_token_index: int = -1) -> Encoded:
    """Ids + loss targets of a whole conversation (training). `num_image_tokens=0`: no image."""
    if num_image_tokens and image_token_index < 0:
        raise ValueError("image_token_index is required when num_image_tokens > 0")
    return _encode(turns, tokenizer, template, num_image_tokens, image_token_index, generation=False)


def encode_prompt(turns: Sequence[Turn], tokenizer: TextTokenizer, template: str | Template = "vicuna_v1",
                  *, num_image_tokens: int = 0, image_token_index: int = -1) -> Encoded:
    """Ids of a generation prompt: the turns (ending with a user turn) then "ASSISTANT:"."""
    if not turns or turns[-1].role != USER:
        raise ConversationError("bad_roles", "a generation prompt must end with a user turn")
    if num_image_tokens and image_token_index < 0:
        raise ValueError("image_token_index is required when num_image_tokens > 0")
    return _encode(turns, tokenizer, template, num_image_tokens, image_token_index, generation=True)


def render(turns: Sequence[Turn], template: str | Template = "vicuna_v1", *, has_image: bool = False,
           generation: bool = False) -> str:
    """The text a conversation stands for (LLaVA's prompt string), for logs and inspection."""
    template = get_template(template)
    out = []
    for kind, text, is_target in _pieces(turns, template, has_image, generation):
        if kind == "image":
            out.append(IMAGE_PLACEHOLDER)
        elif kind == "eos":
            out.append("</s>")
        elif kind == "text":
            # Answers are encoded without the space that follows "ASSISTANT:"; put it back.
            out.append(template.sep + text if is_target and template.style == "two" else text)
    return "".join(out)


def truncate(encoded: Encoded, max_length: int) -> Encoded | None:
    """Cuts the tail to `max_length`, keeping image placeholders whole; None if they cannot fit."""
    if len(encoded) <= max_length:
        return encoded
    if encoded.image_span is not None and encoded.image_span[1] > max_length:
        return None
    return dataclasses.replace(encoded, ids=encoded.ids[:max_length], targets=encoded.targets[:max_length],
                               truncated=True)
