"""The metrics' own image preprocessing, as their reference code does it.

Scores are only comparable with published numbers when the pixels reaching the model are the
same, so each metric reproduces its reference's resize exactly (PIL bicubic with PIL's
antialiasing on uint8, or torchvision's on float tensors where the reference resizes after
``ToTensor``; integer sizes rounded as torchvision rounds them) rather than using the
differentiable JAX resize of ``safe_jax.train.rewards`` (which ReFL needs and which differs from
PIL in the last bits).

- ``resize_shorter_crop``: torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL
  image: clean-fid's ``clip_vit_b_32`` mode, ImageReward's BLIP transform, CLIP's processor.
- ``resize_longest_pad``: HPS v2's ``ResizeMaxSize``: the longest side to ``size``, then zero
  padding to a centred square. HPS applies it after ``ToTensor``, so the resize is PyTorch's
  antialiased bicubic on float pixels (not PIL on uint8): no rounding, no clamping.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 [H, W, 3] array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {array.dtype} {array.shape}")
    return Image.fromarray(array, "RGB")


def resize_shorter_crop(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (PIL bicubic), centre crop ``size``² (torchvision's rounding)."""
    pil = as_pil(image)
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)  # torchvision truncates the long side
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    w, h = pil.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resize_longest_pad(image: np.ndarray | Image.Image, size: int, fill: float = 0.0) -> np.ndarray:
    """HPS v2's ``ToTensor`` + ``ResizeMaxSize(size)``: float32 [size, size, 3] in ToTensor's
    [0, 1] scale (bicubic overshoot kept), the longest side resized to ``size``, centred, padded
    with ``fill``.

    HPS (hpsv2's ``image_transform(resize_longest_max=True)``) resizes the float tensor with
    torchvision's antialiased bicubic and pads afterwards, so quantising to uint8 or resizing
    with PIL first would move the score. Sizes round as Python's ``round(side * size / longest)``;
    the padding puts the odd pixel right/bottom. One deliberate difference: HPS skips the resize
    *and the padding* when the longest side already equals ``size``, handing the model a
    non-square tensor it cannot take; here such images are padded like all others.
    """
    # The JAX reward path's filter; imported here, not at the top, so the reward registry can
    # import the metrics without a cycle.
    from safe_jax.train.rewards import resize_matrix

    pixels = np.asarray(as_pil(image), dtype=np.float32) / np.float32(255.0)  # ToTensor
    h, w = pixels.shape[:2]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    out = np.full((size, size, 3), fill, dtype=np.float32)
    if (new_h, new_w) != (h, w):
        rows = resize_matrix(h, new_h, True).astype(np.float64)
        cols = resize_matrix(w, new_w, True).astype(np.float64)
        pixels = np.einsum("oh,hwc->owc", rows, pixels.astype(np.float64))
        pixels = np.einsum("pw,owc->opc", cols, pixels).astype(np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = pixels
    return out


def normalise(pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
              ) -> np.ndarray:
    """(x − mean)/std in float32, as ToTensor + Normalize compute it: uint8 pixels are divided by
    255 first, float pixels (``resize_longest_pad``'s) are taken as already in [0, 1]."""
    x = np.asarray(pixels)
    x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_shorter_crop_floor(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """transformers' ``CLIPImageProcessor`` resize + crop (torchmetrics' CLIPScore, PickScore).

    The resize is ``resize_shorter_crop``'s (PIL bicubic, the long side truncated), but the
    processor floors the crop offset where torchvision rounds half to even: when the long side
    exceeds ``size`` by 3 mod 4 the two crops sit one pixel apart.
    """
    pil = as_pil(image)
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)


def crop_square_resize(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """CMMD's ``io_util``: the centred square of the shorter side (offsets floored), then PIL
    bicubic to ``size``² — a crop before the resize, unlike CLIP's resize-then-crop."""
    pil = as_pil(image)
    w, h = pil.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    pil = pil.crop((left, top, left + side, top + side))
    return np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)
