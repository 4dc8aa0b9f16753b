"""CLIP image preprocessing, identical to HF `CLIPImageProcessor`, plus LLaVA's pad-to-square.

Steps (each the same operation, in the same dtype, as the HF processor, so results match
bit for bit): convert to RGB (transparency composited onto white, as transformers does),
optionally pad to a square with the mean colour (LLaVA `image_aspect_ratio="pad"`), resize
the shortest side with PIL bicubic, centre crop, rescale by 1/255 in float64 then cast to
float32, normalise with the CLIP mean/std in float32. Output: NHWC float32 [S, S, 3].
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(ValueError):
    """An image that cannot be used; `reason` is "missing_image" or "corrupt_image"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited onto white (what transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, color: Sequence[int]) -> Image.Image:
    """LLaVA's expand2square: pastes the image centred on a square canvas of `color`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(path: str) -> Image.Image:
    """Opens and fully decodes an image file; raises ImageLoadError on any failure."""
    if not os.path.isfile(path):
        raise ImageLoadError("missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageLoadError("corrupt_image", f"cannot decode image {path}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """CLIP preprocessing. `size`: shortest edge after resize; `crop_size`: output side."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True  # LLaVA-RLHF uses image_aspect_ratio="pad"

    @classmethod
    def for_image_size(cls, image_size: int, pad_to_square: bool = True) -> "ImageProcessor":
        """The CLIP processor of a vision tower with input side `image_size` (224, 336, 56...)."""
        return cls(size=image_size, crop_size=image_size, pad_to_square=pad_to_square)

    @classmethod
    def from_pretrained(cls, path: str, pad_to_square: bool = True) -> "ImageProcessor":
        """Reads a local HF `preprocessor_config.json` (file or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
        with open(path) as f:
            cfg = json.load(f)
        size, crop = cfg.get("size", 224), cfg.get("crop_size", 224)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = crop.get("height") if isinstance(crop, dict) else crop
        return cls(size=int(size), crop_size=int(crop), mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                   std=tuple(cfg.get("image_std", CLIP_STD)), pad_to_square=pad_to_square)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # LLaVA truncates mean * 255 to int: (122, 116, 104) for CLIP.
        return tuple(int(m * 255) for m in self.mean)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.crop_size, self.crop_size, 3)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        if self.pad_to_square:
            image = expand_to_square(image, self.pad_color)
        width, height = image.size
        # Shortest side -> size; the long side is truncated, as HF (and torchvision) do.
        if width <= height:
            new_w, new_h = self.size, int(self.size * height / width)
        else:
            new_w, new_h = int(self.size * width / height), self.size
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(image)
        pixels = _center_crop(pixels, self.crop_size)
        pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (pixels - mean) / std

    def load(self, path: str) -> np.ndarray:
        """Decodes and preprocesses an image file; raises ImageLoadError."""
        return self(load_image(path))


def _center_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    """HF's centre crop: offsets floor((dim - side) / 2); zero-pads (centred) if too small."""
    height, width = pixels.shape[:2]
    if height < side or width < side:
        out = np.zeros((max(height, side), max(width, side), 3), pixels.dtype)
        top, left = -(-(out.shape[0] - height) // 2), -(-(out.shape[1] - width) // 2)
        out[top:top + height, left:left + width] = pixels
        pixels, height, width = out, out.shape[0], out.shape[1]
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top:top + side, left:left + side]
