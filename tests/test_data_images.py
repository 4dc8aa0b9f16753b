"""CLIP preprocessing parity with HF's CLIPImageProcessor, LLaVA pad-to-square, load errors."""
import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from llava_jax.data import CLIP_MEAN, CLIP_STD, ImageLoadError, ImageProcessor, load_image

try:  # transformers >= 5: the PIL implementation (the one LLaVA used) under its own name
    from transformers import CLIPImageProcessorPil as HFCLIPProcessor
except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
    from transformers import CLIPImageProcessor as HFCLIPProcessor


def hf_processor(size):
    return HFCLIPProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def hf_pixels(processor, image):
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)  # CHW -> HWC


def synthetic(kind, width, height, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "rgb":
        return Image.fromarray(rgb, "RGB")
    if kind == "grey":
        return Image.fromarray(rgb[..., 0], "L")
    if kind == "rgba":
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    if kind == "palette":
        image = Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        image.info["transparency"] = 5  # a transparent palette entry, as GIFs / PNGs carry
        return image
    if kind == "grey_alpha":
        return Image.fromarray(rgb, "RGB").convert("LA")
    raise ValueError(kind)


CASES = [("rgb", 37, 91), ("rgb", 301, 157), ("grey", 91, 37), ("rgba", 64, 63), ("palette", 45, 130),
         ("grey_alpha", 23, 17), ("rgb", 56, 56)]


@pytest.mark.parametrize("size", [56, 224, 336])
@pytest.mark.parametrize("kind,width,height", CASES)
def test_matches_hf_clip_processor(size, kind, width, height):
    image = synthetic(kind, width, height)
    ours = ImageProcessor.for_image_size(size, pad_to_square=False)(image)
    ref = hf_pixels(hf_processor(size), image)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6


def _padded_reference(image):
    """LLaVA's expand2square built independently with numpy: RGB centred on mean-colour canvas."""
    rgb = np.asarray(image)
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = (122, 116, 104)  # int(255 * CLIP mean)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    return Image.fromarray(canvas)


@pytest.mark.parametrize("size", [56, 336])
@pytest.mark.parametrize("kind,width,height", CASES)
def test_pad_to_square_then_clip(size, kind, width, height):
    image = synthetic(kind, width, height, seed=1)
    processor = ImageProcessor.for_image_size(size)
    assert processor.pad_color == (122, 116, 104)
    # Transparent pixels become white first (HF's RGB conversion), then the square is padded.
    rgb = Image.fromarray(np.asarray(convert_to_rgb(image)))
    ref = hf_pixels(hf_processor(size), _padded_reference(rgb))
    assert np.abs(processor(image) - ref).max() <= 1e-6


def test_padding_is_visible_for_wide_images():
    # A wide white image: the top and bottom rows of the output are the (normalised) pad colour.
    processor = ImageProcessor.for_image_size(56)
    out = processor(Image.new("RGB", (112, 28), (255, 255, 255)))
    pad = (np.float32(np.array([122, 116, 104], np.float64) / 255) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    np.testing.assert_allclose(out[0, 28], pad, atol=1e-6)
    np.testing.assert_allclose(out[28, 28], (1 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD), atol=1e-5)


def test_from_pretrained_reads_hf_config(tmp_path):
    hf_processor(336).save_pretrained(str(tmp_path))
    processor = ImageProcessor.from_pretrained(str(tmp_path))
    assert (processor.size, processor.crop_size) == (336, 336)
    np.testing.assert_allclose(processor.mean, CLIP_MEAN)
    np.testing.assert_allclose(processor.std, CLIP_STD)


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageLoadError) as err:
        load_image(str(tmp_path / "nope.png"))
    assert err.value.reason == "missing_image"
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    good = tmp_path / "good.png"
    synthetic("rgb", 40, 40).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])  # truncated file
    for name in ("junk.png", "cut.png"):
        with pytest.raises(ImageLoadError) as err:
            load_image(str(tmp_path / name))
        assert err.value.reason == "corrupt_image"
    assert load_image(str(good)).mode == "RGB"
