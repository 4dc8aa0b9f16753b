"""Conversation templates: exact token / label layout, LLaVA parity, image placement, truncation."""
import numpy as np
import pytest

from llava_jax.data import (ASSISTANT, IGNORE_INDEX, USER, ConversationError, HFTokenizer, Template, Turn,
                            encode_conversation, encode_prompt, get_template, normalize_turns, register_template,
                            render, truncate)
from llava_jax.data.templates import VICUNA_SYSTEM
from llava_jax.data.toy import build_tokenizer

IMG, N = 511, 4
CORPUS = [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 20 + [
    "What is in the image? There is a red circle in the top left.",
    "What color is it? It is red. Describe the picture. A blue square.",
    "How many sides does a triangle have? Three sides.\n"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A LLaMA-like BPE tokenizer trained offline, saved and reloaded the way real ones are."""
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(CORPUS).save_pretrained(str(path))
    return HFTokenizer.from_pretrained(str(path))


def conv(*texts):
    return [Turn((USER, ASSISTANT)[k % 2], t) for k, t in enumerate(texts)]


def test_vicuna_system_line_is_the_published_one():
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The "
                             "assistant gives helpful, detailed, and polite answers to the user's questions.")


def test_vicuna_v1_exact_layout_two_rounds_with_image(tok):
    turns = conv("What is in the image?", "There is a red circle.", "What color is it?", "It is red.")
    enc = encode_conversation(turns, tok, "vicuna_v1", num_image_tokens=N, image_token_index=IMG)
    e = tok.encode
    head = [tok.bos_id] + e(VICUNA_SYSTEM + " USER: ")
    q1 = e("\nWhat is in the image? ASSISTANT:")
    a1 = e("There is a red circle.") + [tok.eos_id]
    q2 = e("USER: What color is it? ASSISTANT:")
    a2 = e("It is red.") + [tok.eos_id]
    expected = head + [IMG] * N + q1 + a1 + q2 + a2
    assert enc.ids.tolist() == expected
    want_targets = [0] * (len(head) + N + len(q1)) + [1] * len(a1) + [0] * len(q2) + [1] * len(a2)
    assert enc.targets.astype(int).tolist() == want_targets
    assert enc.image_span == (len(head), len(head) + N)
    labels = enc.labels
    assert (labels[enc.targets] == enc.ids[enc.targets]).all() and (labels[~enc.targets] == IGNORE_INDEX).all()
    # Both </s> are targets; BOS, placeholders and user text never are.
    eos_positions = np.flatnonzero(enc.ids == tok.eos_id)
    assert len(eos_positions) == 2 and enc.targets[eos_positions].all()
    assert not enc.targets[enc.ids == IMG].any() and not enc.targets[0]
    assert render(turns, has_image=True) == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: There is a red circle.</s>"
        "USER: What color is it? ASSISTANT: It is red.</s>")


def _llava_reference(prompt: str, tok: HFTokenizer, n: int, has_image: bool):
    """LLaVA's way, re-derived from its documented behaviour: tokenise the whole prompt string
    (chunks split at <image>, BOS once), then mask by per-round token counts."""
    hf = tok.hf

    def tok_image(text):
        chunks = text.split("<image>")
        ids = hf(chunks[0]).input_ids
        for chunk in chunks[1:]:
            ids += [IMG] * n + hf(chunk).input_ids[1:]
        return ids

    ids = tok_image(prompt) if has_image else hf(prompt).input_ids
    target = np.ones(len(ids), bool)
    target[0] = False
    cur = 1
    for rou in prompt.split("</s>"):
        if not rou:
            break
        parts = rou.split(" ASSISTANT: ")
        assert len(parts) == 2
        count = tok_image if has_image else (lambda t: hf(t).input_ids)
        round_len = len(count(rou))
        instruction_len = len(count(parts[0] + " ASSISTANT: ")) - 2  # minus BOS and the trailing "▁"
        target[cur:cur + instruction_len] = False
        cur += round_len
    target[cur:] = False
    assert cur == len(ids), "tokenisation mismatch in the reference itself"
    return ids, target


@pytest.mark.parametrize("has_image", [True, False])
def test_matches_llava_full_string_tokenization_and_masking(tok, has_image):
    turns = conv("<image>\nDescribe the picture.", "A blue square.", "How many sides does a triangle have?",
                 "Three sides.")
    turns = normalize_turns([{"from": ("human", "gpt")[k % 2], "value": t.text} for k, t in enumerate(turns)])
    enc = encode_conversation(turns, tok, "vicuna_v1", num_image_tokens=N if has_image else 0, image_token_index=IMG)
    ids, target = _llava_reference(render(turns, has_image=has_image), tok, N, has_image)
    assert enc.ids.tolist() == ids
    assert enc.targets.tolist() == target.tolist()


def test_image_moves_to_start_of_first_user_turn(tok):
    raw = [{"from": "human", "value": "What color is it?\n<image>"}, {"from": "gpt", "value": "Red."},
           {"from": "human", "value": "<image> And now?"}, {"from": "gpt", "value": "Blue."}]
    turns = normalize_turns(raw)
    assert [t.text for t in turns] == ["What color is it?", "Red.", "And now?", "Blue."]
    enc = encode_conversation(turns, tok, num_image_tokens=N, image_token_index=IMG)
    assert (enc.ids == IMG).sum() == N  # one image, expanded once
    start, end = enc.image_span
    assert (enc.ids[start:end] == IMG).all()
    assert enc.ids[:start].tolist() == [tok.bos_id] + tok.encode(VICUNA_SYSTEM + " USER: ")
    text_only = encode_conversation(turns, tok)
    assert not (text_only.ids == IMG).any() and text_only.image_span is None


def test_plain_template(tok):
    turns = conv("<image>\nignored question", "A blue square.")
    enc = encode_conversation(turns, tok, "plain", num_image_tokens=N, image_token_index=IMG)
    caption = tok.encode("A blue square.\n")
    assert enc.ids.tolist() == [tok.bos_id] + [IMG] * N + caption
    assert enc.targets.tolist() == [False] * (1 + N) + [True] * len(caption)
    assert render(turns, "plain", has_image=True) == "<image>A blue square.\n"


def test_generation_prompt_ends_with_assistant(tok):
    prompt = encode_prompt(conv("What is in the image?"), tok, num_image_tokens=N, image_token_index=IMG)
    tail = tok.encode("\nWhat is in the image? ASSISTANT:")
    assert prompt.ids[-len(tail):].tolist() == tail
    assert not prompt.targets.any()
    assert render(conv("What is in the image?"), has_image=True, generation=True).endswith("image? ASSISTANT:")
    # The prompt is the prefix of the full conversation: the policy continues exactly there.
    full = encode_conversation(conv("What is in the image?", "A red circle."), tok, num_image_tokens=N,
                               image_token_index=IMG)
    assert full.ids[:len(prompt)].tolist() == prompt.ids.tolist()
    with pytest.raises(ConversationError):
        encode_prompt(conv("Q", "A"), tok)


def test_truncation_keeps_image_whole(tok):
    turns = conv("What is in the image?", "There is a red circle in the top left.")
    enc = encode_conversation(turns, tok, num_image_tokens=N, image_token_index=IMG)
    cut = truncate(enc, len(enc) - 3)
    assert cut.truncated and len(cut) == len(enc) - 3
    assert cut.ids.tolist() == enc.ids[:-3].tolist() and cut.targets.tolist() == enc.targets[:-3].tolist()
    assert truncate(enc, len(enc)) is enc and not enc.truncated
    assert truncate(enc, enc.image_span[1]) is not None
    assert truncate(enc, enc.image_span[1] - 1) is None  # would split the image placeholders


@pytest.mark.parametrize("raw,reason", [
    ([], "empty_conversation"),
    ([{"from": "gpt", "value": "hello"}], "empty_conversation"),  # leading gpt turn dropped -> nothing left
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "bad_roles"),
    ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], "bad_roles"),
    ([{"from": "human"}], "missing_field"),
    ([{"from": "human", "value": 3}], "missing_field"),
])
def test_bad_conversations(raw, reason):
    with pytest.raises(ConversationError) as err:
        normalize_turns(raw)
    assert err.value.reason == reason


def test_leading_assistant_turn_is_dropped():
    turns = normalize_turns([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}])
    assert turns == [Turn(USER, "q"), Turn(ASSISTANT, "a")]


def test_registry_adds_templates(tok):
    custom = register_template(Template("test_bot", system="Be brief.", roles=("Q", "A")), "test_alias")
    assert get_template("test_bot") is custom and get_template("test_alias") is custom
    assert get_template("vicuna_v1") is get_template("v1")
    enc = encode_conversation(conv("hi", "yo"), tok, "test_bot")
    assert render(conv("hi", "yo"), "test_bot") == "Be brief. Q: hi A: yo</s>"
    assert enc.ids.tolist() == [tok.bos_id] + tok.encode("Be brief. Q: hi A:") + tok.encode("yo") + [tok.eos_id]
    with pytest.raises(KeyError):
        get_template("no_such_template")
    with pytest.raises(ValueError):
        register_template(Template("bad", style="weird"))
