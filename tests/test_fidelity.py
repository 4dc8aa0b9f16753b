"""Where we follow or leave the original LLaVA-RLHF, against references written from its code
(RLHF/models/ppo_trainer.py, rl_trainer.py, rl_models.py, data_utils/common_utils.py; LLaVA's
conversation.py and train.py; Eval/model_vqa.py, Eval/eval_scripts/eval_pope.sh): one test per
row of docs/ppo.md's tables of differences, on padded batches with and without EOS. The references are ports of the
original's semantics in PyTorch / plain Python, not our code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llava_jax.rl import fact_reward, ppo, rollout, setup as ppo_setup
from llava_jax.rl.batches import Rollout
from llava_jax.settings import PPOSettings
from llava_jax.data.templates import USER, Turn, normalize_turns, render

B, N = 4, 7
# Right-padded responses: stopped (EOS inside), stopped at the last position, cut short at
# the length limit (no EOS), and a one-token answer.
MASK = np.array([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], bool)
RNG = np.random.default_rng(7)
LOGP = RNG.normal(-2, 1, (B, N)).astype(np.float32)
REF = RNG.normal(-2, 1, (B, N)).astype(np.float32)
VALUES = RNG.normal(0, 1, (B, N)).astype(np.float32)
SCORE = np.array([1.5, -0.5, -8.2, 2.0], np.float32)


def _hyper(**ppo_fields) -> ppo.PPOHyper:
    """PPOHyper as a run builds it (rl.setup.ppo_hyper) from the settings tree's `ppo` defaults
    with `ppo_fields` changed."""
    return ppo_setup.ppo_hyper(PPOSettings(**ppo_fields))


# --- references, from the original's code -------------------------------------------------

def original_whiten(x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """ppo_trainer.whiten(async_stats="full_batch") on one process: every entry counts."""
    mean, std = x.mean(), x.std(unbiased=False)
    out = (x - mean) / (std + 1e-8)
    return out if shift_mean else out + mean


def original_advantages(logp, ref, values, score, mask, kl_coef=0.1, gamma=1.0, lam=1.0):
    """PPOTrainer._shape_reward + _estimate_advantage. Pads carry log-prob 0 under both
    policies (compute_logprobs' ignore_index); the score lands on the tensor's last column."""
    logp = torch.where(torch.as_tensor(mask), torch.as_tensor(logp), 0.0)
    ref = torch.where(torch.as_tensor(mask), torch.as_tensor(ref), 0.0)
    values = torch.as_tensor(values)
    kl = torch.clamp(logp - ref, min=0.0)
    shaped = -kl_coef * kl
    shaped[:, -1] += torch.as_tensor(score)
    rewards = shaped * 10.0
    last, reversed_adv, n = 0.0, [], rewards.shape[1]
    for t in reversed(range(n)):
        next_values = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return original_whiten(advantages).numpy(), (advantages + values).numpy()


def original_loss(logp, old_logp, advantages, vpred, old_values, returns, mask, over=None, clip=0.2, vclip=0.2,
                  vf_coef=0.1):
    """compute_policy_loss + vf_coef x compute_value_loss: means over every [B, N] position
    (`over` None), or over the `over` positions (the same formulas, masked)."""
    m = torch.as_tensor(mask)
    logp = torch.where(m, logp, 0.0)
    old_logp = torch.where(m, torch.as_tensor(old_logp), 0.0)
    adv = torch.as_tensor(advantages)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip))
    old_values, returns = torch.as_tensor(old_values), torch.as_tensor(returns)
    clipped = torch.clamp(vpred, old_values - vclip, old_values + vclip)
    vf = 0.5 * torch.maximum((vpred - returns) ** 2, (clipped - returns) ** 2)
    if over is not None:
        pg, vf = pg[torch.as_tensor(over)], vf[torch.as_tensor(over)]
    return pg.mean() + vf_coef * vf.mean()


def original_truncate(row: list[int], eos: int, pad: int, additional: list[int]) -> list[int]:
    """rl_trainer.truncate_after_eos_with_padding for one response."""
    try:
        end = row.index(eos)
    except ValueError:
        end = None
    for token in additional:
        if token in row:
            end = row.index(token)
    if end is None:
        return list(row)
    return row[:end + 1] + [pad] * (len(row) - end - 1)


# --- 1. advantages: the score on the last column, whitening over every position -----------

def _rollout():
    return Rollout(response_mask=jnp.asarray(MASK), logprobs=jnp.asarray(np.where(MASK, LOGP, 0.0)),
                   ref_logprobs=jnp.asarray(REF), values=jnp.asarray(VALUES), score=jnp.asarray(SCORE),
                   valid=jnp.ones(B, jnp.int32))  # ref log-probs at pads are whatever the pass computed


def test_advantages_over_pads_equal_the_original():
    hyper = _hyper(whiten_over_pads=True, loss_over_pads=True)
    out, _ = ppo.compute_advantages(hyper, _rollout(), jnp.float32(0.1))
    advantages, returns = original_advantages(LOGP, REF, VALUES, SCORE, MASK)
    np.testing.assert_allclose(out.advantages, advantages, atol=1e-5)
    np.testing.assert_allclose(out.returns, returns, atol=1e-4)
    pad = ~MASK
    np.testing.assert_allclose(np.asarray(out.returns)[pad], (10 * SCORE[:, None] + 0 * VALUES)[pad], atol=1e-4)


def test_valid_token_layout_keeps_the_raw_returns_and_changes_only_the_statistics():
    ours, _ = ppo.compute_advantages(_hyper(whiten_over_pads=False, loss_over_pads=False), _rollout(), jnp.float32(0.1))
    original, _ = ppo.compute_advantages(_hyper(whiten_over_pads=True, loss_over_pads=False), _rollout(),
                                         jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(ours.returns)[MASK], np.asarray(original.returns)[MASK], atol=1e-4)
    raw = np.asarray(ours.returns) - VALUES
    np.testing.assert_allclose(np.asarray(ours.advantages)[MASK],
                               ((raw[MASK] - raw[MASK].mean()) / (raw[MASK].std() + 1e-8)), atol=1e-5)
    assert not np.allclose(np.asarray(ours.advantages)[MASK], np.asarray(original.advantages)[MASK], atol=1e-2)
    assert np.all(np.asarray(ours.advantages)[~MASK] == 0)


# --- 2. losses: means over every position ------------------------------------------------

@pytest.mark.parametrize("over_pads", [True, False])
def test_losses_and_their_gradients_equal_the_original(over_pads):
    rng = np.random.default_rng(3)
    advantages = rng.normal(0, 1, (B, N)).astype(np.float32)
    returns = rng.normal(0, 3, (B, N)).astype(np.float32)
    new_logp = (LOGP + rng.normal(0, 0.3, (B, N))).astype(np.float32)
    vpred = (VALUES + rng.normal(0, 0.5, (B, N))).astype(np.float32)
    batch = Rollout(response_mask=jnp.asarray(MASK), logprobs=jnp.asarray(np.where(MASK, LOGP, 0.0)),
                    advantages=jnp.asarray(advantages), values=jnp.asarray(VALUES), returns=jnp.asarray(returns))
    hyper = _hyper(whiten_over_pads=False, loss_over_pads=over_pads)

    def ours(logp, values):
        total, aux = ppo.objective_sums(hyper, logp, jnp.zeros_like(logp), values, batch)
        return total / aux["tokens"]

    loss, (g_logp, g_values) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(new_logp), jnp.asarray(vpred))
    t_logp, t_vpred = torch.tensor(new_logp, requires_grad=True), torch.tensor(vpred, requires_grad=True)
    reference = original_loss(t_logp, LOGP, advantages, t_vpred, VALUES, returns, MASK,
                              over=None if over_pads else MASK)
    reference.backward()
    np.testing.assert_allclose(loss, reference.item(), rtol=1e-5)
    np.testing.assert_allclose(g_logp, t_logp.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(g_values, t_vpred.grad.numpy(), atol=1e-6)
    assert np.all(np.asarray(g_logp)[~MASK] == 0)  # a pad's policy term never has a gradient
    assert np.any(np.asarray(g_values)[~MASK] != 0) == over_pads  # the value loss fits V(pad) only over pads


# --- 3. the '?' cut ----------------------------------------------------------------------

EOS, PAD, Q1, Q2 = 2, 0, 7, 9  # Q1, Q2 stand for LLaMA's 1577 ("?") and 29973 ("\n?")
CUT_ROWS = [[5, Q1, 6, EOS, 0, 0], [5, 6, Q1, 8, Q2, 6], [5, Q2, 6, Q1, EOS, 0], [5, 6, EOS, 0, 0, 0],
            [5, 6, 6, 6, 6, 6], [Q1, EOS, 0, 0, 0, 0]]


def test_question_mark_cut_equals_the_original():
    tokens = np.asarray(CUT_ROWS, np.int32)
    mask = np.zeros_like(tokens, bool)
    for i, row in enumerate(CUT_ROWS):  # our sampler's mask: up to and including EOS
        mask[i, :row.index(EOS) + 1 if EOS in row else len(row)] = True
    logprobs = np.where(mask, -1.0, 0.0).astype(np.float32)
    got_tokens, got_mask, got_logprobs = rollout.cut_responses(jnp.asarray(tokens), jnp.asarray(mask),
                                                               jnp.asarray(logprobs), (Q1, Q2), PAD)
    expected = np.asarray([original_truncate(row, EOS, PAD, [Q1, Q2]) for row in CUT_ROWS])
    np.testing.assert_array_equal(got_tokens, expected)
    np.testing.assert_array_equal(got_mask, expected != PAD)  # the original's mask: responses.ne(pad)
    np.testing.assert_array_equal(got_logprobs, np.where(expected != PAD, -1.0, 0.0))


def test_a_cut_response_has_lost_its_stop_and_its_tail():
    """The cut feeds the score as the original's: no EOS -> the no-stop penalty; the length
    is the cut response's."""
    tokens = np.asarray(CUT_ROWS, np.int32)
    mask = np.asarray([original_truncate(row, EOS, PAD, [Q1, Q2]) for row in CUT_ROWS]) != PAD
    b, n = tokens.shape
    batch = Rollout(response=jnp.asarray(np.where(mask, tokens, PAD)), response_mask=jnp.asarray(mask),
                    logprobs=jnp.zeros((b, n)), ref_logprobs=jnp.zeros((b, n)), values=jnp.zeros((b, n)),
                    rm_raw=jnp.zeros(b), correct=jnp.zeros(b), length_bonus=jnp.ones(b), valid=jnp.ones(b))
    weights = fact_reward.RewardWeights(rm_weight=1.0, correct_bonus=2.0, length_bonus=-10.0, no_stop_penalty=-8.0)
    hyper = _hyper(whiten_over_pads=False, loss_over_pads=False)
    out, _ = rollout.finish_rollout(hyper, weights, n, EOS, batch, jnp.float32(0.1))
    stopped = np.asarray([EOS in original_truncate(r, EOS, PAD, [Q1, Q2]) for r in CUT_ROWS])
    length = mask.sum(1)
    np.testing.assert_allclose(out.score, -10.0 * length / n - 8.0 * (~stopped), atol=1e-5)
    assert stopped.tolist() == [False, False, False, True, False, False]


def test_question_mark_ids_are_found_as_the_original_finds_them():
    """The original takes encode("?")[0] and encode("\\n?")[-1] and asserts they are 1577 and
    29973: "?" with and without LLaMA's word prefix. A tokenizer that splits the prefix off
    (the toy's) has one "?" token."""
    from transformers import LlamaTokenizerFast
    from tokenizers import Tokenizer, decoders, models, normalizers

    from llava_jax.data import load_tokenizer
    from llava_jax.data.tokenizer import HFTokenizer
    from llava_jax.rl.setup import question_mark_ids

    toy = load_tokenizer("data/toy/tokenizer")
    assert question_mark_ids(toy) == (toy.encode("?")[-1],) and toy.decode(question_mark_ids(toy)) == "?"
    # A LLaMA-style sentencepiece vocabulary holding both pieces, as Vicuna's does.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "\u2581?": 4, "?": 5, "<0x0A>": 6}
    core = Tokenizer(models.BPE(vocab, [("\u2581", "?")], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    llama = HFTokenizer(LlamaTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>"))
    assert llama.encode("?") == [4] and llama.encode("\n?")[-1] == 5
    assert question_mark_ids(llama) == (4, 5)


# --- 4. the learning-rate schedule per PPO step ---------------------------------------------

@pytest.mark.parametrize("unit", ["rollout", "update"])
def test_schedule_equals_hf_stepped_as_the_original(unit):
    from transformers import get_cosine_schedule_with_warmup

    from configs.ppo_13b import get_config
    from llava_jax.rl.setup import ppo_optimizer
    from llava_jax.settings import RunSettings

    cfg = get_config()
    cfg.ppo.rollout_batch, cfg.ppo.step_batch, cfg.ppo.ppo_epochs = 8, 4, 2
    cfg.ppo.lr_schedule_unit = unit
    steps, updates = 12, 4
    _, schedule = ppo_optimizer(RunSettings.from_config(cfg), steps)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.learning_rate)
    total = steps if unit == "rollout" else steps * updates
    hf = get_cosine_schedule_with_warmup(opt, cfg.optim.warmup_steps, total)
    expected = []
    for _ in range(steps):  # RLTrainer.step: rollout, the PPO updates, then lr_scheduler.step()
        for _ in range(updates):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            if unit == "update":
                hf.step()
        if unit == "rollout":
            hf.step()
    got = [float(schedule(c)) for c in range(steps * updates)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
    if unit == "rollout":
        assert got[:updates] == [0.0] * updates  # the whole first rollout trains at lr 0


# --- 6. the reward model's input ------------------------------------------------------------

INTRO = "Specifically, judge it against these captions of the image:"
# A prompt file shaped like the original's fact_rlhf_reward_prompt.txt (our own words): the
# original's trainer reads it, strips it, prepends " " and fills {factual_prompt} with
# FACTUAL_PROMPT + "  - caption\n" per caption.
ORIGINAL_SHAPED = ("USER: Please rate your last answer on two points:\n\n"
                   "1. Accurate: it states only what the image supports. {factual_prompt}\n"
                   "2. Concise: it is brief.\n\nA good answer is both. ASSISTANT: So the score of my last answer is")
OURS_APPEND = """# the same input in our format (append layout)
[append]
 USER: Please rate your last answer on two points:

1. Accurate: it states only what the image supports. {facts}

2. Concise: it is brief.

A good answer is both. ASSISTANT: So the score of my last answer is
[facts]
Specifically, judge it against these captions of the image:
{captions}
[caption]
  - {caption}
"""


def test_reward_input_of_an_original_shaped_prompt_file(tmp_path):
    """Stopped and unstopped responses: the original's sequence is query + the response's ids
    as sampled (its </s> only when it stopped) + the tokenised rating text."""
    from llava_jax.data import load_tokenizer
    from llava_jax.data.reward_prompt import RewardPrompt
    from test_ppo_math import _sampled

    tokenizer = load_tokenizer("data/toy/tokenizer")
    path = tmp_path / "original_shaped.txt"
    path.write_text(OURS_APPEND)
    prompt = RewardPrompt.from_file(str(path))
    assert prompt.layout == "append" and not prompt.eos_always
    captions = ["A red square in the top left.", "Two shapes on grey.", "A blue circle at the bottom."]
    metas = [{"image": "shapes_000.png", "captions": captions}] * 2
    sampled = _sampled(tokenizer, "Describe the image.", ["A red square.", "A red square and a"], [True, False])
    ids, mask = fact_reward.reward_inputs(metas, *sampled, tokenizer, prompt, with_facts=True, template="vicuna_v1",
                                          seed=(3,), pad_id=tokenizer.pad_id)
    query_ids, query_mask, response, response_mask = sampled
    for i in range(2):
        order = fact_reward.shuffled_captions(captions, (3, i))
        factual = INTRO + "\n" + "".join(f"  - {c}\n" for c in order)
        text = (" " + ORIGINAL_SHAPED.strip()).format(factual_prompt=factual)
        expected = np.concatenate([query_ids[i][query_mask[i] == 1], response[i][response_mask[i] == 1],
                                   tokenizer.encode(text)])
        np.testing.assert_array_equal(ids[i][mask[i] == 1], expected)
    assert tokenizer.eos_id in ids[0][mask[0] == 1] and tokenizer.eos_id not in ids[1][mask[1] == 1]


def test_turn_layout_closes_every_response_with_eos():
    from llava_jax.data import load_tokenizer
    from llava_jax.data.reward_prompt import RewardPrompt
    from test_ppo_math import _sampled

    tokenizer = load_tokenizer("data/toy/tokenizer")
    prompt = RewardPrompt.from_file()
    sampled = _sampled(tokenizer, "Describe the image.", ["A red square.", "A red square."], [True, False])
    ids, mask = fact_reward.reward_inputs([{"image": "x.png", "captions": ["c"]}] * 2, *sampled, tokenizer, prompt,
                                          with_facts=False, template="vicuna_v1", seed=(0,), pad_id=tokenizer.pad_id)
    np.testing.assert_array_equal(ids[0], ids[1])  # an unstopped response is closed as a template turn


def test_prompt_file_errors_name_the_file_and_the_section(tmp_path):
    from llava_jax.data.reward_prompt import RewardPrompt

    path = tmp_path / "bad.txt"
    path.write_text("[append]\n USER: rate it. {facts} ASSISTANT: score\n")
    with pytest.raises(ValueError, match=r"bad\.txt.*\[facts\]"):
        RewardPrompt.from_file(str(path))
    path.write_text(OURS_APPEND + "[user]\nx {facts}\n")
    with pytest.raises(ValueError, match="one layout"):
        RewardPrompt.from_file(str(path))


# --- 7. templates ---------------------------------------------------------------------------

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_llava_v1_and_whitespace_as_llava_renders_them():
    """LLaVA's preprocess_multimodal strips the image turn only; conv_llava_v1.get_prompt then
    writes SYSTEM + " " + "ROLE: message" + (" " after users, "</s>" after assistants)."""
    conversation = [{"from": "human", "value": "<image>\n What is it? "}, {"from": "gpt", "value": " A cat.\n"},
                    {"from": "human", "value": "And the colour? "}, {"from": "gpt", "value": "Grey. "}]
    messages = []
    for k, m in enumerate(conversation):
        value = m["value"]
        if "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        messages.append(("USER" if k % 2 == 0 else "ASSISTANT", value))
    expected = LLAVA_V1_SYSTEM + " " + "".join(
        f"{role}: {message}" + (" " if role == "USER" else "</s>") for role, message in messages)
    assert render(normalize_turns(conversation), "llava_v1", has_image=True) == expected
    assert render(normalize_turns(conversation), "vicuna_v1", has_image=True) != expected


# --- 8. the evaluation protocol -------------------------------------------------------------

# Eval/eval_scripts/eval_pope.sh's --test-prompt, as bash passes it: inside single quotes "\n"
# stays two characters, a backslash and an "n".
EVAL_POPE_SH_TEST_PROMPT = "\\nAnswer the question using a single word or phrase."
# Eval/model_vqa.py's argparse default for --test-prompt (a Python "\n": a newline).
MODEL_VQA_DEFAULT_TEST_PROMPT = "\nAnswer the question using a single word or phrase."


def original_model_vqa_ids(text: str, test_prompt: str, hf, num_image_tokens: int, image_token_index: int) -> list[int]:
    """Eval/model_vqa.py's prompt ids for one question (mm_use_im_start_end off): "<image>\n" +
    the question, `qs += args.test_prompt` as given, conv_templates["llava_v1"].get_prompt(),
    then LLaVA's tokenizer_image_token (the string tokenised whole between placeholders, BOS
    once), its one image id standing for the image's `num_image_tokens` features."""
    qs = "<image>" + "\n" + text
    if test_prompt:
        qs += test_prompt
    prompt = LLAVA_V1_SYSTEM + " " + "USER: " + qs + " " + "ASSISTANT:"
    chunks = [hf(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [image_token_index] * num_image_tokens + chunk[1:]  # each chunk's BOS dropped
    return ids


def test_eval_pope_sh_passes_a_backslash_and_an_n():
    """What bash hands model_vqa.py from the script's line (POSIX shell quoting), through the
    same argparse argument; without the flag, its default's real newline."""
    import argparse
    import shlex

    line = r"--image_aspect_ratio pad --test-prompt '\nAnswer the question using a single word or phrase.'"
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_aspect_ratio", type=str, default="pad")
    parser.add_argument("--test-prompt", type=str, default=MODEL_VQA_DEFAULT_TEST_PROMPT)
    assert parser.parse_args(shlex.split(line)).test_prompt == EVAL_POPE_SH_TEST_PROMPT
    assert EVAL_POPE_SH_TEST_PROMPT[:2] == "\\" + "n" and "\n" not in EVAL_POPE_SH_TEST_PROMPT
    assert parser.parse_args([]).test_prompt == MODEL_VQA_DEFAULT_TEST_PROMPT


@pytest.mark.parametrize("name, test_prompt", [("llava-rlhf", EVAL_POPE_SH_TEST_PROMPT),
                                               ("llava-rlhf-newline", MODEL_VQA_DEFAULT_TEST_PROMPT)])
def test_llava_rlhf_pope_prompt_ids_equal_model_vqa(tmp_path, name, test_prompt):
    """`llava-rlhf`: Eval/eval_pope.sh's prompt ids (its --test-prompt as bash passes it through
    model_vqa.py); `llava-rlhf-newline`: model_vqa.py's default test prompt. llava_v1 (its
    --conv-mode default), temperature 0.2 (default), 64 tokens (short_eval) either way."""
    import json

    from llava_jax.data import EvalDataset, load_tokenizer, vision_kwargs
    from llava_jax.data.eval_data import PROTOCOLS
    from llava_jax.models.llava import tiny_config

    protocol = PROTOCOLS[name]["pope"]
    assert (protocol.template, protocol.suffix, protocol.temperature, protocol.max_new_tokens) == (
        "llava_v1", test_prompt, 0.2, 64)
    tokenizer = load_tokenizer("data/toy/tokenizer")
    text = "Is there a red square in the image?"
    questions = tmp_path / "pope.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "eval_000.png", "text": text, "label": "yes"}) + "\n")
    config = tiny_config()
    dataset = EvalDataset(str(questions), tokenizer, fmt="pope", image_folder="data/toy/images",
                          template=protocol.template, suffix=protocol.suffix, max_length=512, **vision_kwargs(config))
    expected = original_model_vqa_ids(text, test_prompt, tokenizer.hf, config.num_image_tokens,
                                      config.image_token_index)
    np.testing.assert_array_equal(dataset.load(0)["input_ids"], expected)
    assert render([Turn(USER, text + protocol.suffix)], "llava_v1", has_image=True, generation=True) == (
        LLAVA_V1_SYSTEM + " USER: <image>\n" + text + test_prompt + " ASSISTANT:")


def test_the_two_pope_suffixes_give_different_ids():
    from llava_jax.data import load_tokenizer
    from llava_jax.data.eval_data import PROTOCOLS

    tokenizer = load_tokenizer("data/toy/tokenizer")
    literal, newline = (PROTOCOLS[name]["pope"].suffix for name in ("llava-rlhf", "llava-rlhf-newline"))
    assert literal == EVAL_POPE_SH_TEST_PROMPT and newline == MODEL_VQA_DEFAULT_TEST_PROMPT
    text = "Is there a red square in the image?"
    literal_ids, newline_ids = tokenizer.encode(text + literal), tokenizer.encode(text + newline)
    assert literal_ids != newline_ids
    assert PROTOCOLS["llava-rlhf"]["vqa"] == PROTOCOLS["llava-rlhf-newline"]["vqa"]
    assert PROTOCOLS["llava-rlhf"]["mmhal"] == PROTOCOLS["llava-rlhf-newline"]["mmhal"]
