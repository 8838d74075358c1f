"""Per-record transforms: JPEG → cropped, flipped, scaled image; caption + subjects → weighted tokens.

Randomness comes only from the ``rng`` grain hands each record (derived from the pipeline seed and
the record's position in the global stream), so a record is transformed identically on every run,
on any number of hosts and after any resume.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Callable, Mapping

import grain
import numpy as np
from PIL import Image

from safe_jax.data.source import as_text, as_texts
from safe_jax.errors import SafeJaxError

CROPS = ("center", "random")
IMAGE_DTYPES = ("float32", "bfloat16", "uint8")


def crop_window(width: int, height: int, resolution: int, crop: str,
                rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """``(left, top, resized_width, resized_height)``: the ``resolution``² crop in the coordinates of
    the image resized so its shorter side is ``resolution`` (draws the random crop's offsets from ``rng``,
    left then top)."""
    scale = resolution / min(width, height)
    rw, rh = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if crop == "random":
        left, top = int(rng.integers(0, rw - resolution + 1)), int(rng.integers(0, rh - resolution + 1))
    else:
        left, top = int(round((rw - resolution) / 2.0)), int(round((rh - resolution) / 2.0))
    return left, top, rw, rh


def crop_box(width: int, height: int, resolution: int, crop: str, rng: np.random.Generator | None) -> tuple:
    """The square, in source pixels, that becomes the ``resolution``² training image.

    As torchvision's Resize(shorter side) then CenterCrop / RandomCrop (diffusers' training
    scripts), but computed in source coordinates so that only the crop is resampled.
    """
    left, top, _, _ = crop_window(width, height, resolution, crop, rng)
    return _source_box(width, height, resolution, left, top)


def _source_box(width: int, height: int, resolution: int, left: int, top: int) -> tuple:
    scale = resolution / min(width, height)
    return (left / scale, top / scale, (left + resolution) / scale, (top + resolution) / scale)


def sdxl_time_ids(width: int, height: int, resolution: int, left: int, top: int, resized_width: int,
                  flipped: bool) -> np.ndarray:
    """SDXL's micro-conditioning for one training image, float32 [6]: ``(original_height,
    original_width, crop_top, crop_left, resolution, resolution)`` as diffusers'
    train_text_to_image_sdxl.py computes them: the source size before any resize, and the crop's
    top-left corner in the resized image — which that script flips *before* cropping, so a flipped
    image's ``crop_left`` is measured in the flipped resized image: the crop that was taken at
    ``left`` and then mirrored is the one at ``resized_width - resolution - left`` there.
    (``left``, ``top``, ``resized_width``: ``crop_window``'s.)

    They describe the pixels this module makes, which differ from that script's in two small ways:
    the longer side is resized to ``round`` (torchvision truncates), and a centre crop is taken
    before the flip, so with an odd margin a flipped image's ``crop_left`` is one less than the
    script's ``round(margin / 2)``. (Versions of the script before its January 2024 flip fix
    cropped first and then set ``x1 = image.width - x1`` with the crop's own width; that is not
    reproduced.)
    """
    x1 = resized_width - resolution - left if flipped else left
    return np.array([height, width, top, x1, resolution, resolution], np.float32)


def load_image(data: bytes, resolution: int, crop: str = "center", flip: bool = False,
               rng: np.random.Generator | None = None, dtype: str = "float32") -> np.ndarray:
    """JPEG bytes → [resolution, resolution, 3]: shorter side resized, cropped, maybe flipped, in [-1, 1].

    ``dtype="uint8"`` keeps 0..255 (4× less to move between processes and to the device; scale it
    there with ``to_unit_range``). ``load_image_and_time_ids`` gives the same pixels (same draws
    from ``rng``) with SDXL's time ids.
    """
    return load_image_and_time_ids(data, resolution, crop, flip, rng, dtype)[0]


def load_image_and_time_ids(data: bytes, resolution: int, crop: str = "center", flip: bool = False,
                            rng: np.random.Generator | None = None,
                            dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """``load_image``'s pixels and the SDXL time ids (``sdxl_time_ids``, float32 [6]) of the very
    crop and flip that made them. ``rng`` is drawn from exactly as ``load_image`` draws: the random
    crop's offsets (left, top), then the flip."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if im.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale in the DCT domain where the result still covers the crop.
        s = resolution / min(w, h)
        im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
    im = im.convert("RGB")
    left, top, rw, _ = crop_window(w, h, resolution, crop, rng)
    box = _source_box(w, h, resolution, left, top)  # crop_box's
    fx, fy = im.size[0] / w, im.size[1] / h  # the draft's reduction
    box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if abs(box[2] - box[0] - resolution) < 1e-6 and all(float(b).is_integer() for b in box):
        im = im.crop(tuple(int(b) for b in box))  # no resampling needed
    else:
        im = im.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
    pixels = np.asarray(im)
    flipped = bool(flip and rng.random() < 0.5)
    if flipped:
        pixels = pixels[:, ::-1]
    time_ids = sdxl_time_ids(w, h, resolution, left, top, rw, flipped)
    if dtype == "uint8":
        return np.ascontiguousarray(pixels), time_ids
    out = pixels.astype(np.float32)
    out *= 2.0 / 255.0
    out -= 1.0
    if dtype == "bfloat16":
        import ml_dtypes

        return out.astype(ml_dtypes.bfloat16), time_ids
    return out, time_ids


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.RandomMap):
    """TFDS record (image bytes) → record with the training image; other fields kept as Python str.

    ``micro_conditioning`` (SDXL) adds ``time_ids``: float32 [6], ``sdxl_time_ids`` of the crop and
    flip applied; the image and the draws from ``rng`` are the same either way.
    """

    resolution: int
    crop: str = "center"
    flip: bool = True
    dtype: str = "float32"
    micro_conditioning: bool = False

    def __post_init__(self):
        if self.crop not in CROPS:
            raise SafeJaxError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.dtype not in IMAGE_DTYPES:
            raise SafeJaxError(f"image dtype must be one of {IMAGE_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.micro_conditioning, bool):
            raise SafeJaxError(f"micro_conditioning must be True or False, got {self.micro_conditioning!r}")

    def random_map(self, features: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image, time_ids = load_image_and_time_ids(features["image"], self.resolution, self.crop, self.flip, rng,
                                                  self.dtype)
        out = {
            "image": image,
            "image_id": as_text(features["image_id"]),
            "caption": as_text(features["caption"]),
            "subjects": as_texts(features.get("subjects")),
        }
        if self.micro_conditioning:
            out["time_ids"] = time_ids
        return out


@dataclasses.dataclass(frozen=True)
class TokenizeWithSubjects(grain.transforms.Map):
    """caption + subjects → ``input_ids`` [77] int32 and ``token_weights`` [77] float32 (SAFE part 1),
    the names the training step reads (the batch's vocabulary from here on: ``images``,
    ``input_ids``, ``token_weights``, ``image_id``, and SDXL's ``time_ids`` [6] float32 where
    ``DecodeImage`` made them).

    Captions and subject lists leave the record here: what follows is fixed-shape arrays only.
    A reward model with its own tokenizer (HPS, ImageReward) therefore gets its text inputs here
    too: ``reward_text`` (caption -> a dict of fixed-shape arrays, e.g. ``reward_input_ids``;
    picklable, since grain's worker processes run it) sees the plain caption, without the
    subject formatting the diffusion model is conditioned on.
    """

    tokenizer: Any
    subject_weight: float
    subject_format: str = "plain"
    max_length: int = 77
    reward_text: Callable[[str], Mapping[str, Any]] | None = None

    def map(self, features: dict[str, Any]) -> dict[str, Any]:
        from safe_jax.text.conditioning import subject_token_weights

        tw = subject_token_weights(self.tokenizer, [features["caption"]], [features["subjects"]],
                                   self.subject_weight, self.subject_format, self.max_length)
        out = {
            "images": features["image"],
            "input_ids": tw.ids[0],
            "token_weights": tw.weights[0],
            "image_id": np.bytes_(features["image_id"].encode("utf-8")),
        }
        if "time_ids" in features:
            out["time_ids"] = features["time_ids"]
        if self.reward_text is not None:
            extra = self.reward_text(features["caption"])
            clash = sorted(set(extra) & set(out))
            if clash:
                raise SafeJaxError(f"reward_text must not replace the batch's {', '.join(clash)}")
            out.update(extra)
        return out


def to_unit_range(images: Any) -> Any:
    """uint8 0..255 → float32 [-1, 1], for pipelines that ship uint8 (works on np and jax arrays)."""
    return images.astype("float32") * (2.0 / 255.0) - 1.0
