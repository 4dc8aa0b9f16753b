"""The reward model's input (Fact-RLHF): the conversation with the response, then a rating
text that asks to judge it against four criteria (with the image's captions inside the
"accurate" criterion when facts are on) and ends with the score phrase; the reward is read
at the phrase's last token.

The wording and its layout are a file (`llava_jax/data/prompts/fact_rlhf_reward.txt` by
default), so users of released reward adapters can write the exact input those were trained
on. Sections, each `[name]` on its own line; a section's text is kept verbatim (spaces
included) except the newlines around it:

* `[facts]` (required): the factual block, `{captions}` where the caption lines go.
* `[caption]` (optional, default `{caption}`): one caption's line; the lines are joined by
  newlines. `  - {caption}` gives the original's bulleted list.
* Then one of two layouts:
  - turn layout, `[user]` (holds `{facts}`) and `[assistant]`: a user turn of the
    conversation template (`USER: ... ASSISTANT:`) after the response, then the score
    phrase. The response always ends with `</s>`, as a template's assistant turn does.
  - append layout, `[append]` (holds `{facts}`): the text appended straight after the
    response's tokens, tokenised on its own; `</s>` is there only if the response stopped.
    This is the original LLaVA-RLHF's PPO input (its trainer appends " " + the prompt file,
    the captions as "  - caption" lines after an intro line): begin the text with that space.
Lines starting with `#` before the first section are comments.

In PPO the input is built from the ids as sampled (`reward_ids`), never from decoded and
re-tokenised text; RM training (`encode_reward_input`) encodes the dataset's answer.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from llava_jax.data.templates import ASSISTANT, Encoded, Turn, encode_prompt, user_turn_text

DEFAULT_PROMPT_FILE = os.path.join(os.path.dirname(__file__), "prompts", "fact_rlhf_reward.txt")
SECTIONS = ("user", "facts", "assistant", "append", "caption")
LAYOUTS = {"turn": ("user", "facts", "assistant"), "append": ("append", "facts")}


@dataclasses.dataclass(frozen=True)
class RewardPrompt:
    facts: str  # holds "{captions}"
    user: str = ""  # turn layout: the rating turn, holds "{facts}"
    assistant: str = ""  # turn layout: the score phrase
    append: str = ""  # append layout: the text after the response, holds "{facts}"
    caption: str = "{caption}"  # one caption's line

    @property
    def layout(self) -> str:
        return "append" if self.append else "turn"

    @property
    def eos_always(self) -> bool:
        """Whether the response is followed by `</s>` even when it did not stop."""
        return self.layout == "turn"

    @classmethod
    def from_file(cls, path: str = DEFAULT_PROMPT_FILE) -> "RewardPrompt":
        sections: dict[str, list[str]] = {}
        current = None
        with open(path) as f:
            for line in f.read().splitlines():
                if line.startswith("#") and current is None:
                    continue
                if line.strip() in {f"[{s}]" for s in SECTIONS}:
                    current = line.strip()[1:-1]
                    sections[current] = []
                elif current is not None:
                    sections[current].append(line)
        text = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
        layout = "append" if "append" in text else "turn"
        missing = [s for s in LAYOUTS[layout] if s not in text]
        if missing:
            raise ValueError(f"{path}: reward prompt lacks section(s) {['[' + s + ']' for s in missing]} "
                             f"(the {layout} layout needs {['[' + s + ']' for s in LAYOUTS[layout]]})")
        if layout == "append" and ("user" in text or "assistant" in text):
            raise ValueError(f"{path}: [append] replaces [user] and [assistant]; give one layout")
        holder = "append" if layout == "append" else "user"
        if "{facts}" not in text[holder] or "{captions}" not in text["facts"]:
            raise ValueError(f"{path}: [{holder}] must contain {{facts}} and [facts] must contain {{captions}}")
        if "{caption}" not in text.get("caption", "{caption}"):
            raise ValueError(f"{path}: [caption] must contain {{caption}}")
        return cls(facts=text["facts"], user=text.get("user", ""), assistant=text.get("assistant", "").strip(),
                   append=text.get("append", ""), caption=text.get("caption", "{caption}"))

    def facts_text(self, captions: Sequence[str] | None) -> str:
        if not captions:
            return ""
        return self.facts.replace("{captions}", "\n".join(self.caption.replace("{caption}", c) for c in captions))

    def user_turn(self, captions: Sequence[str] | None) -> str:
        """The rating text with the facts filled in (the user turn, or the appended text)."""
        return (self.append or self.user).replace("{facts}", self.facts_text(captions))

    def suffix_ids(self, tokenizer, captions: Sequence[str] | None, template: str = "vicuna_v1") -> np.ndarray:
        """The ids that follow the response (and its `</s>`, when there is one)."""
        if self.layout == "append":
            return np.asarray(tokenizer.encode(self.user_turn(captions)), np.int32)
        turn = tokenizer.encode(user_turn_text(self.user_turn(captions), template))
        return np.asarray(turn + tokenizer.encode(self.assistant), np.int32)


def reward_ids(query_ids: np.ndarray, response_ids: np.ndarray, stopped: bool, captions: Sequence[str] | None,
               tokenizer, prompt: RewardPrompt, template: str = "vicuna_v1") -> np.ndarray:
    """A sampled response's reward-model input: the query's ids (its image placeholders in the
    reward tower's count), the response's ids as sampled (its `</s>` included when it stopped;
    added when not, in the turn layout only), then the rating text."""
    tail = [tokenizer.eos_id] if prompt.eos_always and not stopped else []
    return np.concatenate([np.asarray(query_ids, np.int32), np.asarray(response_ids, np.int32),
                           np.asarray(tail, np.int32), prompt.suffix_ids(tokenizer, captions, template)])


def encode_reward_input(turns: Sequence[Turn], captions: Sequence[str] | None, tokenizer, prompt: RewardPrompt, *,
                        num_image_tokens: int, image_token_index: int, template: str = "vicuna_v1") -> Encoded:
    """A dataset conversation's reward-model input (RM training): `turns` end with the
    assistant response to score, a complete answer (so followed by `</s>`); captions None =
    no facts."""
    if not turns or turns[-1].role != ASSISTANT:
        raise ValueError("the reward input must end with the assistant response to score")
    query = encode_prompt(turns[:-1], tokenizer, template, num_image_tokens=num_image_tokens,
                          image_token_index=image_token_index)
    ids = reward_ids(query.ids, tokenizer.encode(turns[-1].text) + [tokenizer.eos_id], True, captions, tokenizer,
                     prompt, template)
    return Encoded(ids, np.zeros(len(ids), bool), query.image_span)
