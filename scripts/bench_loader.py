#!/usr/bin/env python
"""Loader throughput on synthetic COCO-sized JPEGs: samples/s and images/s at 224 and 336 px.

  python scripts/bench_loader.py [--images 192] [--batch-size 16] [--workers 2] [--sizes 224 336]

Writes random 640x480 JPEGs (plus 1 text-only item in 8) into a temporary folder, builds an
SFT dataset in the LLaVA format with the bundled toy tokenizer, and times full batches
(decode + pad-to-square + CLIP preprocessing + tokenisation + collation) after one warm-up
batch. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from llava_jax.data import ImageProcessor, Loader, SFTDataset, load_tokenizer  # noqa: E402
from llava_jax.data.toy import TOY_DIR  # noqa: E402


def make_data(folder: str, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        # Smooth random images (noise compresses unrealistically badly as JPEG).
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BILINEAR).save(
            os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        record = {"id": str(i), "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": "There is a red circle in the top left and a blue square. " * 4}]}
        if i % 8:
            record["image"] = f"{i:06d}.jpg"
        records.append(record)
    path = os.path.join(folder, "sft.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def bench(path: str, folder: str, size: int, args) -> tuple[float, float]:
    tokenizer = load_tokenizer(os.path.join(TOY_DIR, "tokenizer"))
    patches = (size // 14) ** 2
    dataset = SFTDataset(path, tokenizer, image_folder=folder, image_processor=ImageProcessor.for_image_size(size),
                         num_image_tokens=patches, image_token_index=511, max_length=patches + 512)
    loader = Loader(dataset, args.batch_size, seed=0, num_workers=args.workers, process_index=0, process_count=1)
    next(loader)  # warm-up: starts the threads
    samples = images = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(loader)
        samples += len(batch["valid"])
        images += sum(m["image"] is not None for m in batch["meta"])
    elapsed = time.perf_counter() - start
    loader.close()
    return samples / elapsed, images / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 336])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = make_data(folder, args.images)
        print(f"{os.cpu_count()} CPUs, {args.workers} decode threads, batch {args.batch_size}, "
              f"640x480 JPEG, 1 in 8 items text-only")
        for size in args.sizes:
            samples, images = bench(path, folder, size, args)
            print(f"{size} px: {samples:7.1f} samples/s  {images:7.1f} images/s")


if __name__ == "__main__":
    main()
