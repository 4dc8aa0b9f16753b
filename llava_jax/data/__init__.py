"""Data: conversation templates, CLIP preprocessing, stage datasets, a resumable sharded loader.

    from llava_jax.data import SFTDataset, Loader, load_tokenizer, vision_kwargs
    tok = load_tokenizer("data/toy/tokenizer")
    ds = SFTDataset("data/toy/sft.json", tok, image_folder="data/toy/images", **vision_kwargs(config))
    for batch in Loader(ds, batch_size=8, seed=0): ...
"""
from llava_jax.data.batching import Batch, Schema, collate, default_buckets, pick_bucket
from llava_jax.data.datasets import (PreferenceDataset, RecordDataset, RLPromptDataset, SFTDataset,
                                     vision_kwargs)
from llava_jax.data.eval_data import (EvalDataset, EvalQuestion, load_eval_questions, make_answer,
                                      write_answers)
from llava_jax.data.images import CLIP_MEAN, CLIP_STD, ImageLoadError, ImageProcessor, expand_to_square, load_image
from llava_jax.data.loader import Loader
from llava_jax.data.records import (CAPTION_TYPE_ANSWERS, BadRecord, DataReport, caption_key, load_captions,
                                    lookup_captions)
from llava_jax.data.templates import (ASSISTANT, IGNORE_INDEX, USER, ConversationError, Encoded, Template, Turn,
                                      encode_conversation, encode_prompt, get_template, normalize_turns,
                                      register_template, render, truncate)
from llava_jax.data.tokenizer import HFTokenizer, TextTokenizer, load_tokenizer

__all__ = [
    "Batch", "Schema", "collate", "default_buckets", "pick_bucket",
    "PreferenceDataset", "RecordDataset", "RLPromptDataset", "SFTDataset", "vision_kwargs",
    "EvalDataset", "EvalQuestion", "load_eval_questions", "make_answer", "write_answers",
    "CLIP_MEAN", "CLIP_STD", "ImageLoadError", "ImageProcessor", "expand_to_square", "load_image",
    "Loader",
    "CAPTION_TYPE_ANSWERS", "BadRecord", "DataReport", "caption_key", "load_captions", "lookup_captions",
    "ASSISTANT", "IGNORE_INDEX", "USER", "ConversationError", "Encoded", "Template", "Turn", "encode_conversation",
    "encode_prompt", "get_template", "normalize_turns", "register_template", "render", "truncate",
    "HFTokenizer", "TextTokenizer", "load_tokenizer",
]
