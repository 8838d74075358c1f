"""Human Preference Score v2 / v2.1 (Wu et al. 2023): an OpenCLIP ViT-H-14 fine-tuned on human
preferences, scored as the cosine of the image and caption embeddings (no logit scale).

HPS numbers are only comparable when every step matches the authors' ``hpsv2`` package, so each
step here reproduces it:

- weights: ``load_hps`` reads ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (an OpenCLIP
  state dict under ``"state_dict"``, loaded strictly by hpsv2) through ``safe_jax.io.open_clip``;
- captions: ``tokenize`` gives OpenCLIP's ids (its text cleaning, CLIP's BPE, SOT/EOT, 77 tokens,
  zero padding, over-long captions cut with EOT kept last);
- images: ``preprocess`` is hpsv2's evaluation transform (``ToTensor``, longest side to 224 with
  antialiased bicubic on the float image, zero padding to a centred square, CLIP mean/std), and
  ``preprocess_jax`` the same in JAX, differentiable, for ReFL on decoded images in [0, 1];
- score: ``hps_score`` is the diagonal of ``image_features @ text_features.T`` of the unit-norm
  features, as hpsv2's ``img_score.score`` computes it (there under CUDA autocast; here in fp32).
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.eval.preprocess import CLIP_MEAN, CLIP_STD, normalise, resize_longest_pad
from safe_jax.io.open_clip import load_open_clip
from safe_jax.models.clip_vision import CLIPModel, l2_normalise

IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
SOT, EOT = 49406, 49407
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # hpsv2's file names


def load_hps(path: str | Path, model_name: str = "ViT-H-14", **kwargs: Any) -> tuple[CLIPModel, dict[str, Any]]:
    """(module, params) of an HPS v2 or v2.1 checkpoint (both are OpenCLIP ViT-H-14; ``model_name``
    names another OpenCLIP architecture); ``kwargs`` go to ``safe_jax.io.open_clip.load_open_clip``
    (dtype, attention_impl, remat_policy, ...)."""
    return load_open_clip(path, model_name, **kwargs)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_ENTITY = re.compile(r"&(#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
})
# Half- and full-width forms to their normal forms, and the ideographic space to a space.
_WIDTH = str.maketrans({0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                                        if unicodedata.normalize("NFKC", chr(i)) != chr(i)}})
_CONTROL = str.maketrans(dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                        0xFEFF, *range(0xFFF9, 0xFFFD)]))


def _fix_text(text: str) -> str:
    """The parts of ``ftfy.fix_text`` (OpenCLIP's first cleaning step) that change real captions.

    ftfy is used when it is installed. Without it, line by line: HTML entities (until a line
    has a '<'), ligatures, full/half-width forms, curly quotes, stray control characters and NFC,
    repeated until nothing changes, as ftfy does. ftfy's repair of mis-decoded text ("cafÃ©",
    cp1252 bytes) and of terminal escape codes is not reproduced: only captions with such damage
    tokenise differently.
    """
    try:
        import ftfy
    except ImportError:
        pass
    else:
        return ftfy.fix_text(text)
    out, unescape = [], True
    for line in text.split("\n"):
        unescape = unescape and "<" not in line  # as ftfy: once a line has '<', no later line is unescaped
        out.append(_fix_segment(line, unescape))
    return "\n".join(out)


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        text = text.translate(_LIGATURES).translate(_WIDTH)
        text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
        text = unicodedata.normalize("NFC", text.translate(_CONTROL))
        if text == before:
            return text


def clean_caption(text: str) -> str:
    """OpenCLIP's text cleaning: ftfy, HTML entities unescaped twice, whitespace runs to one
    space, lower case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


@functools.cache
def _bpe():
    from safe_jax.text.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


def tokenize(captions: Sequence[str] | str, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """OpenCLIP's ``get_tokenizer("ViT-H-14")(captions)`` as int32 [B, context_length].

    Cleaned captions go through CLIP's BPE (the transformers tokenizer of the same vocabulary,
    which on cleaned text splits and merges as OpenCLIP does). Rows are SOT, the caption's
    tokens, EOT, then zeros; a caption too long keeps its first ``context_length − 2`` tokens and
    still ends in EOT. One difference, for captions nobody writes: OpenCLIP reads the literal text
    ``<start_of_text>`` / ``<end_of_text>`` in a caption as its special tokens; here all caption
    text is text.
    """
    if isinstance(captions, str):
        captions = [captions]
    if context_length < 2:
        raise SafeJaxError(f"HPS tokenizer: context_length must be at least 2, got {context_length}")
    cleaned = [clean_caption(caption) for caption in captions]
    encoded = _bpe()(cleaned, add_special_tokens=False, split_special_tokens=True,
                     verbose=False)["input_ids"] if cleaned else []
    out = np.zeros((len(cleaned), context_length), np.int32)
    for row, ids in zip(out, encoded):
        tokens = [SOT, *ids[:context_length - 2], EOT]
        row[:len(tokens)] = tokens
    return out


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def preprocess(images: Sequence[Any] | Any, size: int = IMAGE_SIZE) -> np.ndarray:
    """hpsv2's evaluation transform of uint8 [H, W, 3] arrays or PIL images (one or a list; any
    sizes): float32 [B, size, size, 3], CLIP-normalised, NHWC."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    elif not isinstance(images, (list, tuple, np.ndarray)):
        images = [images]
    return np.stack([normalise(resize_longest_pad(image, size)) for image in images])


def longest_pad_shape(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left) of hpsv2's ``ResizeMaxSize(size)`` for an image of that size."""
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def preprocess_jax(images: jax.Array, size: int = IMAGE_SIZE) -> jax.Array:
    """``preprocess`` in JAX for images already in [0, 1] (float, [B, H, W, 3]): differentiable
    and jit-able. The resize and the zero padding are one matrix product per axis (the padding
    rows are zero), so padded pixels get no gradient and the result equals ``preprocess`` of the
    same pixels up to float32 rounding."""
    from safe_jax.train.rewards import resize_matrix  # not at the top: the reward registry may import this module

    if images.ndim != 4 or images.shape[-1] != 3:
        raise SafeJaxError(f"HPS: images must be [B, H, W, 3] in [0, 1], got {tuple(images.shape)}")
    _, h, w, _ = images.shape
    new_h, new_w, top, left = longest_pad_shape(h, w, size)

    def placed(n: int, new: int, start: int) -> np.ndarray:
        matrix = np.zeros((size, n), np.float32)
        matrix[start:start + new] = np.eye(n, dtype=np.float32) if new == n else resize_matrix(n, new, True)
        return matrix

    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(placed(h, new_h, top)), images.astype(jnp.float32), precision=hi)
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(placed(w, new_w, left)), x, precision=hi)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def _features(model: CLIPModel, pixel_values: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (l2_normalise(model.get_image_features(pixel_values)),
            l2_normalise(model.get_text_features(input_ids)))


def hps_features(model: CLIPModel, params: Mapping[str, Any], pixel_values: jax.Array, input_ids: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Unit-norm (image [B, P], text [B', P]) features, fp32: OpenCLIP's ``normalize=True`` outputs."""
    return model.apply({"params": params}, jnp.asarray(pixel_values), jnp.asarray(input_ids), method=_features)


def hps_score(model: CLIPModel, params: Mapping[str, Any], pixel_values: jax.Array, input_ids: jax.Array
              ) -> jax.Array:
    """HPS of image i with caption i: [B] cosines. ``pixel_values`` [B, 224, 224, 3] from
    ``preprocess``, ``input_ids`` [B, 77] from ``tokenize``. Pure: wrap it in ``jax.jit``
    (``model`` static)."""
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise SafeJaxError(f"HPS: {pixel_values.shape[0]} images but {input_ids.shape[0]} captions")
    image, text = hps_features(model, params, pixel_values, input_ids)
    return jnp.sum(image * text, axis=-1)


@dataclass(frozen=True)
class HPSText:
    """caption -> ``{"reward_input_ids": int32 [context_length]}``: the input pipeline's per-record
    text transform for the HPS reward (picklable, for grain's worker processes).

    Training batches also carry the SD tokenizer's ``input_ids``, and those give other HPS text
    features whenever OpenCLIP's cleaning changes the caption (HTML entities, curly quotes) or the
    subjects are formatted into it ("prefix"); how they are padded does not matter (pooling at the
    first EOT of a causal tower)."""

    context_length: int = CONTEXT_LENGTH

    def __call__(self, caption: str) -> dict[str, np.ndarray]:
        return {"reward_input_ids": tokenize(caption, self.context_length)[0]}


@dataclass(frozen=True)
class HPSReward:
    """HPS as a ReFL reward, ``safe_jax.train.rewards``' interface: ``reward(params, images,
    batch) -> [B]`` with ``images`` [B, H, W, 3] in [0, 1] (any size) and ``batch`` holding the
    captions' precomputed ``text_embeds``, or their ids from ``tokenize``: ``reward_input_ids``
    (what training batches carry, see ``HPSText``), else ``input_ids``. The text side is constant
    (stop_gradient); gradients reach ``images`` through the model and ``preprocess_jax``."""

    model: CLIPModel
    name: str = "hps"

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def text_embeds(self, params: Mapping[str, Any], input_ids: jax.Array) -> jax.Array:
        features = self.model.apply({"params": params}, jnp.asarray(input_ids), method="get_text_features")
        return l2_normalise(features)

    def image_embeds(self, params: Mapping[str, Any], images: jax.Array) -> jax.Array:
        pixels = preprocess_jax(images, self.image_size)
        return l2_normalise(self.model.apply({"params": params}, pixels, method="get_image_features"))

    def __call__(self, params: Mapping[str, Any], images: jax.Array, batch: Mapping[str, Any] | None = None
                 ) -> jax.Array:
        batch = batch or {}
        if "text_embeds" in batch:
            text = batch["text_embeds"]
        elif "reward_input_ids" in batch or "input_ids" in batch:
            text = self.text_embeds(params, batch["reward_input_ids" if "reward_input_ids" in batch else "input_ids"])
        else:
            raise SafeJaxError(f"reward '{self.name}' needs batch['text_embeds'], batch['reward_input_ids'] or "
                               "batch['input_ids']")
        return jnp.sum(self.image_embeds(params, images) * jax.lax.stop_gradient(text), axis=-1)

    def init_params(self, seed: int = 0) -> dict[str, Any]:
        """Random weights (tests, the demo): ``load_hps`` gives the real ones."""
        from safe_jax.io.clip_folder import init_params

        return init_params(self.model, seed)
