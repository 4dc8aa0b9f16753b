"""The reward model's input (Fact-RLHF): the conversation with the response, one more user
turn asking to rate it against four criteria (with the image's captions inside the
"accurate" criterion when facts are on), then an assistant turn that opens with the score
phrase; the reward is read at its last token.

The wording is a file (`llava_jax/prompts/fact_rlhf_reward.txt` by default) so users of
released reward adapters can point at the exact text those were trained with.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from llava_jax.data.templates import ASSISTANT, USER, Encoded, Turn, encode_prompt

DEFAULT_PROMPT_FILE = os.path.join(os.path.dirname(__file__), "prompts", "fact_rlhf_reward.txt")
SECTIONS = ("user", "facts", "assistant")


@dataclasses.dataclass(frozen=True)
class RewardPrompt:
    user: str  # holds "{facts}"
    facts: str  # holds "{captions}"
    assistant: str

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
        missing = [s for s in SECTIONS if s not in sections]
        if missing:
            raise ValueError(f"{path}: reward prompt lacks section(s) {['[' + s + ']' for s in missing]}")
        text = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
        if "{facts}" not in text["user"] or "{captions}" not in text["facts"]:
            raise ValueError(f"{path}: [user] must contain {{facts}} and [facts] must contain {{captions}}")
        return cls(text["user"], text["facts"], text["assistant"].strip())

    def user_turn(self, captions: Sequence[str] | None) -> str:
        facts = self.facts.replace("{captions}", "\n".join(captions)) if captions else ""
        return self.user.replace("{facts}", facts)


def encode_reward_input(turns: Sequence[Turn], captions: Sequence[str] | None, tokenizer, prompt: RewardPrompt, *,
                        num_image_tokens: int, image_token_index: int, template: str = "vicuna_v1") -> Encoded:
    """`turns` end with the assistant response to score; captions None = no facts."""
    if not turns or turns[-1].role != ASSISTANT:
        raise ValueError("the reward input must end with the assistant response to score")
    prompt_ids = encode_prompt([*turns, Turn(USER, prompt.user_turn(captions))], tokenizer, template,
                               num_image_tokens=num_image_tokens, image_token_index=image_token_index)
    tail = np.asarray(tokenizer.encode(prompt.assistant), np.int32)
    ids = np.concatenate([prompt_ids.ids, tail])
    return Encoded(ids, np.zeros(len(ids), bool), prompt_ids.image_span)
