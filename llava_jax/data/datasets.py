"""Datasets for each stage, in the exact LLaVA-RLHF record formats (JSON list or JSONL).

* `SFTDataset`: `{id, image?, conversations}` -> input_ids, labels, loss_mask, pixel_values.
* `PreferenceDataset`: `{..., conversations, output_1, output_2, preference, hallucination?}`
  -> input_ids / attention_mask [B, 2, T] (output_1, output_2), choice (0: output_1 won),
  hallucination (1/0, -1 unknown), pixel_values (one image per pair), captions in meta.
* `RLPromptDataset`: `{image, conversations, caption_type?, length_bonus?}` joined with the
  captions map (`aok_` key rule for multiple-choice items) -> prompt ids ending with
  "ASSISTANT:", caption_type, length_bonus, pixel_values (+ reward_pixel_values).

Records are validated when the file is read (bad ones skipped and counted, see records.py);
images are decoded and text tokenised lazily in `load(i)`, which the loader runs in worker
threads. `load` returns None for a record that turns out bad (missing/corrupt image, too
long), after reporting it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from llava_jax.data.batching import Schema
from llava_jax.data.images import ImageLoadError, ImageProcessor, load_image
from llava_jax.data.records import (CAPTION_TYPE_ANSWERS, DataReport, check_record, lookup_captions,
                                    read_records)
from llava_jax.data.templates import (ASSISTANT, IGNORE_INDEX, USER, ConversationError, Encoded, Template, Turn,
                                      encode_conversation, encode_prompt, normalize_turns, truncate)
from llava_jax.data.tokenizer import TextTokenizer


def vision_kwargs(config: Any, pad_to_square: bool = True) -> dict[str, Any]:
    """Dataset keyword arguments from a model config (`LlavaConfig` or anything shaped like it)."""
    return dict(num_image_tokens=int(config.num_image_tokens), image_token_index=int(config.image_token_index),
                image_processor=ImageProcessor.for_image_size(int(config.vision.image_size), pad_to_square))


class SkipRecord(Exception):
    """Raised by dataset code for a bad record; `reason` is its counter name in the report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Item:
    """A validated record: what `load` needs to build its example."""

    index: int  # record index in the file
    image: str | None
    data: dict


class RecordDataset:
    """Base: reads + validates records; `load(i)` builds example i (None if it is bad)."""

    kind = "records"
    schema: Schema

    def __init__(self, path: str, tokenizer: TextTokenizer, *, image_processor: ImageProcessor,
                 num_image_tokens: int, image_token_index: int, image_folder: str = "",
                 template: str | Template = "vicuna_v1", max_length: int = 2048, strict: bool = False):
        self.path, self.tokenizer, self.template = path, tokenizer, template
        self.image_processor, self.image_folder = image_processor, image_folder
        self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index
        self.max_length = max_length
        self.report = DataReport(os.path.basename(path), strict)
        self.items: list[Item] = []
        for index, record in read_records(path, self.report):
            try:
                item = self._parse(index, record)
            except (ConversationError, SkipRecord) as e:
                self.report.skip(e.reason, index, str(e))
                continue
            if item is not None:
                self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, keep: Sequence[int], split: str = "") -> RecordDataset:
        """This dataset restricted to items `keep` (positions in `items`, in that order). With a
        `split` name (e.g. "held out") the subset counts its load-time skips in a DataReport of
        its own (`<file> (<split>)`); without one it shares this dataset's report."""
        out = copy.copy(self)
        out.items = [self.items[i] for i in keep]
        if split:
            out.report = DataReport(f"{self.report.source} ({split})", self.report.strict)
            out.report.total = len(out.items)
        return out

    def load(self, i: int) -> dict | None:
        item = self.items[i]
        try:
            example = self._build(item)
        except (ImageLoadError, ConversationError, SkipRecord) as e:
            self.report.skip(e.reason, item.index, str(e))
            return None
        example["meta"] = {"index": item.index, "image": item.image, **example.get("meta", {})}
        return example

    # -- helpers for subclasses
    def _parse(self, index: int, record: Any) -> Item | None:
        raise NotImplementedError

    def _build(self, item: Item) -> dict:
        raise NotImplementedError

    def _image(self, item: Item, *processors: ImageProcessor) -> Any:
        """The item's image through `processors` (default: the dataset's), decoded once."""
        processors = processors or (self.image_processor,)
        if item.image is None:
            pixels = [None] * len(processors)
        else:
            image = load_image(os.path.join(self.image_folder, item.image))
            pixels = [p(image) for p in processors]
        return pixels if len(processors) > 1 else pixels[0]

    def _n_image(self, item: Item) -> int:
        return self.num_image_tokens if item.image is not None else 0

    def _turns(self, record: dict) -> list[Turn]:
        return normalize_turns(record["conversations"])

    def _fit(self, item: Item, encoded: Encoded, cut: bool) -> Encoded:
        """Truncates (SFT) or rejects (when the end matters) sequences over max_length."""
        if len(encoded) <= self.max_length:
            return encoded
        short = truncate(encoded, self.max_length) if cut else None
        if short is None:
            raise SkipRecord("too_long", f"{len(encoded)} tokens > max_length {self.max_length}")
        self.report.truncated(item.index)
        return short


class SFTDataset(RecordDataset):
    """LLaVA conversations for SFT (`vicuna_v1`) or stage-1 pretraining (`plain`)."""

    kind = "sft"

    def __init__(self, path: str, tokenizer: TextTokenizer, **kwargs):
        super().__init__(path, tokenizer, **kwargs)
        self.schema = self.batch_schema(tokenizer.pad_id, self.image_processor.shape)

    @staticmethod
    def batch_schema(pad_id: int, image_shape: tuple[int, int, int]) -> Schema:
        return Schema(sequences={"input_ids": pad_id, "labels": IGNORE_INDEX, "loss_mask": 0},
                      masks={"attention_mask": "input_ids"}, images={"pixel_values": image_shape})

    def _parse(self, index, record):
        if not check_record(record, self.report, index, {"conversations": list}):
            return None
        turns = self._turns(record)
        if not any(t.role == ASSISTANT for t in turns):
            raise SkipRecord("empty_conversation", "no assistant turn to learn from")
        return Item(index, record.get("image"), {"turns": turns, "id": record.get("id")})

    def _build(self, item):
        encoded = encode_conversation(item.data["turns"], self.tokenizer, self.template,
                                      num_image_tokens=self._n_image(item), image_token_index=self.image_token_index)
        encoded = self._fit(item, encoded, cut=True)
        return {"input_ids": encoded.ids, "labels": encoded.labels, "loss_mask": encoded.targets.astype(np.int32),
                "pixel_values": self._image(item), "meta": {"id": item.data["id"]}}


EncodeFn = Callable[[Sequence[Turn], "list[str] | None", int], Encoded]


class PreferenceDataset(RecordDataset):
    """Preference pairs. Each side = the context turns + that output as the last assistant turn.

    `encode_fn(turns, captions, num_image_tokens) -> Encoded` replaces the default encoding
    (the plain vicuna_v1 conversation ending with </s>), e.g. to append the reward-model
    rating turn with the captions. Captions are shuffled with a fixed seed per record. Pairs
    longer than `max_length` are skipped, not cut: the reward is read at the last token."""

    kind = "preference"

    def __init__(self, path: str, tokenizer: TextTokenizer, *, captions: Mapping[str, list[str]] | None = None,
                 encode_fn: EncodeFn | None = None, seed: int = 0, **kwargs):
        self.captions, self.encode_fn, self.seed = captions, encode_fn, seed
        super().__init__(path, tokenizer, **kwargs)
        self.schema = self.batch_schema(tokenizer.pad_id, self.image_processor.shape)

    @staticmethod
    def batch_schema(pad_id: int, image_shape: tuple[int, int, int]) -> Schema:
        return Schema(sequences={"input_ids": pad_id}, masks={"attention_mask": "input_ids"},
                      images={"pixel_values": image_shape}, scalars={"choice": np.int32, "hallucination": np.int32},
                      pairs=True)

    def _parse(self, index, record):
        if not check_record(record, self.report, index, {"conversations": list, "output_1": dict, "output_2": dict}):
            return None
        outputs = [record[k].get("value") for k in ("output_1", "output_2")]
        if not all(isinstance(o, str) for o in outputs):
            raise SkipRecord("missing_field", "output_1/output_2 need a string 'value'")
        preference = record.get("preference")
        if isinstance(preference, bool) or preference not in (1, 2):
            raise SkipRecord("bad_preference", f"preference must be 1 or 2, got {preference!r}")
        turns = self._turns(record)
        context = turns[:-1] if turns[-1].role == ASSISTANT else turns  # the last gpt turn is replaced
        if not context or context[-1].role != USER:
            raise SkipRecord("bad_roles", "the context must end with a user turn")
        captions = None
        if self.captions is not None and record.get("image") is not None:
            captions = lookup_captions(self.captions, record["image"])
            if captions is None:
                raise SkipRecord("missing_captions", f"no captions for {record['image']!r}")
            order = np.random.default_rng([self.seed, index]).permutation(len(captions))
            captions = [captions[j] for j in order]
        hallucination = record.get("hallucination")
        return Item(index, record.get("image"), {
            "context": context, "outputs": outputs, "choice": int(preference) - 1, "captions": captions,
            "hallucination": -1 if hallucination is None else int(bool(hallucination)), "id": record.get("id")})

    def _encode(self, item, turns):
        if self.encode_fn is not None:
            return self.encode_fn(turns, item.data["captions"], self._n_image(item))
        return encode_conversation(turns, self.tokenizer, self.template, num_image_tokens=self._n_image(item),
                                   image_token_index=self.image_token_index)

    def _build(self, item):
        ids = tuple(self._fit(item, self._encode(item, [*item.data["context"], Turn(ASSISTANT, out)]), cut=False).ids
                    for out in item.data["outputs"])
        d = item.data
        return {"input_ids": ids, "pixel_values": self._image(item), "choice": d["choice"],
                "hallucination": d["hallucination"], "meta": {"id": d["id"], "captions": d["captions"]}}


class RLPromptDataset(RecordDataset):
    """PPO prompts: the first user turn, as a generation prompt (left padding suits it).

    As LLaVA-RLHF, prompts over `max_query_tokens` are skipped, counting the image as ONE
    token; the padded length is therefore `max_query_tokens - 1 + num_image_tokens`. A
    second `reward_image_processor` adds `reward_pixel_values` for a reward model whose
    vision tower differs (7B policy at 224 px, 13B reward at 336 px)."""

    kind = "rl_prompts"

    def __init__(self, path: str, tokenizer: TextTokenizer, *, captions: Mapping[str, list[str]] | None = None,
                 max_query_tokens: int = 128, reward_image_processor: ImageProcessor | None = None, **kwargs):
        self.captions, self.max_query_tokens = captions, max_query_tokens
        self.reward_image_processor = reward_image_processor
        kwargs.setdefault("max_length", max_query_tokens - 1 + kwargs["num_image_tokens"])
        super().__init__(path, tokenizer, **kwargs)
        images = {"pixel_values": self.image_processor.shape}
        if reward_image_processor is not None:
            images["reward_pixel_values"] = reward_image_processor.shape
        self.schema = Schema(sequences={"input_ids": tokenizer.pad_id}, masks={"attention_mask": "input_ids"},
                             images=images, scalars={"caption_type": np.int32, "length_bonus": np.float32})

    def _parse(self, index, record):
        if not check_record(record, self.report, index, {"conversations": list}):
            return None
        query = self._turns(record)[0]
        caption_type = record.get("caption_type", 1)
        if isinstance(caption_type, bool) or caption_type not in CAPTION_TYPE_ANSWERS:
            raise SkipRecord("bad_caption_type", f"caption_type must be 1..7, got {caption_type!r}")
        length_bonus = record.get("length_bonus", 1.0)
        if isinstance(length_bonus, bool) or not isinstance(length_bonus, (int, float)):
            raise SkipRecord("missing_field", f"length_bonus must be a number, got {length_bonus!r}")
        image = record.get("image")
        captions = None
        if self.captions is not None and image is not None:
            captions = lookup_captions(self.captions, image, int(caption_type))
            if captions is None:
                raise SkipRecord("missing_captions", f"no captions for {image!r} (caption_type {caption_type})")
        return Item(index, image, {"query": query, "caption_type": int(caption_type), "captions": captions,
                                    "length_bonus": float(length_bonus), "id": record.get("id")})

    def _build(self, item):
        d = item.data
        encoded = encode_prompt([d["query"]], self.tokenizer, self.template, num_image_tokens=self._n_image(item),
                                image_token_index=self.image_token_index)
        text_tokens = len(encoded) - max(self._n_image(item) - 1, 0)
        if text_tokens > self.max_query_tokens:
            raise SkipRecord("too_long", f"query of {text_tokens} tokens > max_query_tokens {self.max_query_tokens}")
        self._fit(item, encoded, cut=False)
        example = {"input_ids": encoded.ids, "caption_type": d["caption_type"], "length_bonus": d["length_bonus"],
                   "meta": {"id": d["id"], "captions": d["captions"], "question": d["query"].text,
                            "answer": CAPTION_TYPE_ANSWERS[d["caption_type"]]}}
        if self.reward_image_processor is None:
            example["pixel_values"] = self._image(item)
        else:
            example["pixel_values"], example["reward_pixel_values"] = self._image(
                item, self.image_processor, self.reward_image_processor)
        return example
