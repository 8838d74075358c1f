"""CLIP-based evaluation scores and features, computed as their reference implementations do.

- ``clipscore``: torchmetrics' ``CLIPScore`` (1.9): 100 · cos(image, caption) per sample
  (``clipscore_per_image``, not clamped), and the metric's value max(mean, 0): the clamp is on
  the mean, not per image (Hessel et al.'s per-image max(cos, 0), ×2.5, is the ReFL reward in
  ``safe_jax.train.rewards``). Pixels: ``clip_processor_pixels``; token ids:
  ``torchmetrics_input_ids``.
- ``pickscore``: PickScore's exp(logit_scale) · cos, with ``clip_processor_pixels`` and
  ``safe_jax.text.tokenizer.tokenize`` (its processor call: padding, truncation at 77).
- FID_CLIP features: clean-fid's ``clip_vit_b_32`` mode, OpenAI CLIP ViT-B/32 ``encode_image``
  (projected, not normalised = transformers' ``get_image_features``) on ``fid_clip_pixels``.
  clean-fid runs that model as ``clip.load`` gives it: float16 on CUDA, float32 on CPU; these
  features are the float32 ones.

torchmetrics hands each image to transformers' ``CLIPProcessor`` as a [C, H, W] tensor; the
processor turns uint8 (or integer-valued) pixels into a PIL image unchanged, so on uint8 images
``clip_processor_pixels`` gives its ``pixel_values`` exactly. Float images in [0, 1] are not the
same: the processor scales them to uint8 by truncation (×255, ``astype``), resizes, divides by
255, then rescales again by 1/255 (it warns), which no published number uses — pass uint8.
The processor's crop floors its offset where clean-fid's torchvision ``CenterCrop`` rounds half
to even, so the two 224² crops of one image may sit one pixel apart (``preprocess``).

torchmetrics tokenises with ``padding=True`` and no truncation and then cuts the ids at 77: a
caption of more than 75 tokens loses its EOS token, and the text tower pools at the largest id
left (legacy configs, ``eos_token_id == 2``) or at position 0 — ``torchmetrics_input_ids`` does
the same; PickScore truncates in the tokenizer, which keeps EOS.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.eval.preprocess import normalise, resize_shorter_crop, resize_shorter_crop_floor
from safe_jax.io.clip_folder import load_clip
from safe_jax.models.clip_vision import CLIPModel, l2_normalise

FID_CLIP_SIZE = 224


def fid_clip_pixels(image: Any, size: int = FID_CLIP_SIZE) -> np.ndarray:
    """clean-fid's ``img_preprocess_clip`` (torchvision resize + centre crop) and CLIP's
    normalisation: float32 [size, size, 3] from a uint8 [H, W, 3] image."""
    return normalise(resize_shorter_crop(image, size))


def clip_processor_pixels(image: Any, size: int) -> np.ndarray:
    """transformers' ``CLIPImageProcessor`` (shortest edge ``size``, crop ``size``, rescale,
    normalise) on a uint8 [H, W, 3] image: float32 [size, size, 3] (channels last)."""
    return normalise(resize_shorter_crop_floor(image, size))


def torchmetrics_input_ids(tokenizer: Any, captions: Sequence[str], max_length: int = 77) -> np.ndarray:
    """Token ids [N, max_length] int32 as torchmetrics feeds CLIP: untruncated, cut at ``max_length``.

    Padding to ``max_length`` rather than to the batch's longest caption changes nothing: the
    text tower is causal and pools at or before the last real token.
    """
    ids = tokenizer(list(captions), padding=False, truncation=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.full((len(ids), max_length), pad, np.int32)
    for row, seq in zip(out, ids):
        seq = seq[:max_length]
        row[:len(seq)] = seq
    return out


def cosine(a: Any, b: Any) -> jax.Array:
    """Row-wise cosine of two [N, P] feature sets (float32, CLIP's normalisation)."""
    return jnp.sum(l2_normalise(jnp.asarray(a)) * l2_normalise(jnp.asarray(b)), axis=-1)


def clipscore_per_image(image_features: Any, text_features: Any) -> jax.Array:
    """torchmetrics' per-sample CLIP score: 100 · cos, in [−100, 100] (no clamp)."""
    return 100.0 * cosine(image_features, text_features)


def clipscore(image_features: Any, text_features: Any) -> jax.Array:
    """torchmetrics' ``CLIPScore`` value: max(mean over the pairs of 100 · cos, 0)."""
    return jnp.maximum(jnp.mean(clipscore_per_image(image_features, text_features)), 0.0)


def pickscore(image_features: Any, text_features: Any, logit_scale: Any) -> jax.Array:
    """PickScore per (image, caption) pair: exp(logit_scale) · cos."""
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * cosine(image_features, text_features)


class CLIPFeatures:
    """A CLIP model's image and text features over any number of inputs, in fixed-size batches.

    The last batch is padded to ``batch_size`` so each tower compiles once for all calls.
    Features are projected and not normalised (transformers' ``get_*_features``); ``*_embeds``
    are the L2-normalised ones.
    """

    def __init__(self, model: CLIPModel, params: Any, batch_size: int = 32):
        if batch_size < 1:
            raise SafeJaxError(f"CLIPFeatures: batch_size must be ≥ 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.params = jax.device_put(params)
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))
        self._text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="get_text_features"))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, batch_size: int = 32) -> "CLIPFeatures":
        """From a transformers ``CLIPModel`` folder (``load_clip``)."""
        model, params = load_clip(folder)
        return cls(model, params, batch_size)

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def logit_scale(self) -> float:
        return float(self.params["logit_scale"])

    def _batched(self, fn, inputs: np.ndarray) -> np.ndarray:
        n, b = inputs.shape[0], self.batch_size
        if n == 0:
            raise SafeJaxError("CLIPFeatures: no inputs")
        out = []
        for start in range(0, n, b):
            chunk = inputs[start:start + b]
            if chunk.shape[0] < b:
                chunk = np.concatenate([chunk, np.zeros((b - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(fn(self.params, chunk), np.float32))
        return np.concatenate(out)[:n]

    def image_features(self, pixels: Any) -> np.ndarray:
        """[N, S, S, 3] normalised pixels (``*_pixels``) → [N, P] float32."""
        pixels = np.asarray(pixels, np.float32)
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise SafeJaxError(f"CLIP image features need [N, {s}, {s}, 3] pixels, got {pixels.shape}")
        return self._batched(self._image, pixels)

    def text_features(self, input_ids: Any) -> np.ndarray:
        """[N, T] token ids → [N, P] float32."""
        input_ids = np.asarray(input_ids, np.int32)
        limit = self.model.config.text.max_position_embeddings
        if input_ids.ndim != 2 or not 0 < input_ids.shape[1] <= limit:
            raise SafeJaxError(f"CLIP text features need [N, T ≤ {limit}] token ids, got {input_ids.shape}")
        return self._batched(self._text, input_ids)

    def image_embeds(self, pixels: Any) -> np.ndarray:
        return np.asarray(l2_normalise(self.image_features(pixels)))

    def text_embeds(self, input_ids: Any) -> np.ndarray:
        return np.asarray(l2_normalise(self.text_features(input_ids)))
