"""Differentiable reward functions for ReFL / DFE fine-tuning, with one interface.

Every reward is a frozen (hashable) object with

    reward(params, images, batch=None) -> [B] float32
    reward.init_params(seed=0)         -> random params (``{}`` for pixel rewards)

``images`` are [B, H, W, 3] in [0, 1] (the clamped VAE decode of ReFL step 5, any size), ``batch``
a dict that may hold ``input_ids`` ([B, T] CLIP token ids of the captions), ``gt_images``
([B, H', W', 3] in [0, 1]) and, to skip recomputing frozen features, ``text_embeds`` /
``gt_image_embeds`` (as returned by ``CLIPReward.text_embeds`` / ``image_embeds``). A reward is a
pure function of (params, inputs): it jits, and its gradient with respect to ``images`` flows
through the reward model and the preprocessing.

Rewards (``make_reward(name, **kwargs)``; add your own with ``register_reward``):

- ``brightness``: mean pixel value. ``target_colour`` (``target=(r, g, b)``): minus the Euclidean
  distance of the image's mean colour to ``target``. Trivial, so tests can show that ReFL
  optimises what it is given.
- ``clip_score`` (``score="pickscore"`` | ``"clipscore"`` | ``"cosine"``), with the aliases
  ``pickscore`` and ``clipscore``: a CLIP caption score. PickScore = exp(logit_scale)·cos(image,
  text); CLIPScore (Hessel et al. 2021) = 2.5·max(cos, 0); ``cosine`` = cos (HPS v2's form).
- ``dfe``: **our design** of the DFE reward (the paper publishes no formula): caption alignment
  plus α times image alignment with the ground-truth image,
  ``r = r_caption(x̂0, caption) + α · cos(f(x̂0), f(x_gt))``, f = the CLIP image embedding (the
  ground-truth side under stop_gradient). Mind the scales: PickScore's caption term is ~20
  (exp(logit_scale) = 100 times a cosine), the image term is a cosine in [-1, 1]; choose α (and
  ReFL's λ) accordingly.
- ``hps`` (HPS v2 / v2.1, ``safe_jax.eval.hps.HPSReward``) and ``imagereward`` (ImageReward,
  ``safe_jax.io.image_reward.ImageRewardReward``): the preference models the ImageReward authors
  fine-tune with, read from one checkpoint file by ``load_reward_checkpoint``. Each tokenises the
  caption its own way, so each comes with a ``text`` transform (caption -> the batch's
  ``reward_input_ids``, plus ``reward_attention_mask`` for ImageReward) that the input pipeline
  applies to the caption before subject formatting (``TokenizeWithSubjects(reward_text=...)``).

CLIP rewards preprocess as ImageReward's ReFL code does (METHOD.md): bicubic resize of the
shorter side to the model's ``image_size`` (224 for every real CLIP), centre crop, CLIP mean/std,
in JAX (``preprocess``). Checkpoints: ``load_clip_reward(folder)`` reads a transformers
``CLIPModel`` folder (openai/clip-vit-large-patch14, PickScore_v1, ...).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.io.clip_folder import init_params as clip_init_params
from safe_jax.io.clip_folder import load_clip
from safe_jax.models.clip_vision import (
    CLIPConfig,
    CLIPModel,
    l2_normalise,
)
from safe_jax.models.clip_vision import (
    preset as clip_preset,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Params = Any
Batch = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """The [out_size, in_size] matrix of PyTorch's 1-D bicubic resampling (align_corners=False).

    ``antialias=True``: ``F.interpolate(mode="bicubic", antialias=True)`` = torchvision ≥ 0.17
    ``Resize`` on tensors, the same filter as PIL's ``BICUBIC`` (a = -0.5, support widened by
    the downscale factor, weights normalised). ``antialias=False``: plain
    ``F.interpolate(mode="bicubic")`` (a = -0.75, 4 taps, edge-clamped), what torchvision < 0.17
    did on tensors. Computed in float64, returned as float32.
    """
    if in_size <= 0 or out_size <= 0:
        raise SafeJaxError(f"cannot resize {in_size} pixels to {out_size}")
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            j = np.arange(lo, hi)
            w = _cubic((j - center + 0.5) * invscale, -0.5)
            total = w.sum()
            matrix[i, lo:hi] = w / total if total != 0 else w
    else:
        for i in range(out_size):
            src = scale * (i + 0.5) - 0.5
            x0 = math.floor(src)
            t = src - x0
            w = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for k in range(4):
                matrix[i, min(max(x0 - 1 + k, 0), in_size - 1)] += w[k]
    return matrix.astype(np.float32)


def resize_bicubic(images: jax.Array, height: int, width: int, *, antialias: bool = True) -> jax.Array:
    """[B, H, W, C] -> [B, height, width, C] bicubic, as PyTorch's ``F.interpolate`` (see
    ``resize_matrix``), as two matrix products: differentiable, jit-able, float32 out."""
    _, h, w, _ = images.shape
    rows = jnp.asarray(resize_matrix(h, height, antialias))
    cols = jnp.asarray(resize_matrix(w, width, antialias))
    return _apply_resize(images, rows, cols)


def _apply_resize(images: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators: this is preprocessing
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hi)


def resize_shorter_crop_shape(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_top, crop_left) of torchvision ``Resize(size)`` + ``CenterCrop(size)``."""
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def preprocess(
    images: jax.Array,
    size: int = 224,
    *,
    antialias: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jax.Array:
    """ImageReward/ReFL reward preprocessing in JAX: [B, H, W, 3] in [0, 1] -> [B, size, size, 3].

    Exactly torchvision's ``Compose([Resize(size, BICUBIC), CenterCrop(size), Normalize(mean,
    std)])`` on float tensors: shorter side to ``size`` (longer side ``int(size·long/short)``),
    crop offsets ``round((new − size)/2)``, no clamping after the resize. The resize is PyTorch's
    bicubic (``resize_matrix``): by default with antialiasing, i.e. torchvision ≥ 0.17 and the
    same filter as PIL's BICUBIC, which CLIP/PickScore/HPS processors apply to PIL images (they
    quantise to uint8 first; we do not). ``antialias=False`` reproduces the ReFL authors' code
    under torchvision < 0.17 (no antialiasing on tensors). The crop is folded into the resize
    matrices, so only the kept pixels are computed. Gradients flow to ``images``.
    """
    if images.ndim != 4 or images.shape[-1] != len(mean):
        raise SafeJaxError(f"images must be [B, H, W, {len(mean)}], got {tuple(images.shape)}")
    _, h, w, _ = images.shape
    new_h, new_w, top, left = resize_shorter_crop_shape(h, w, size)
    rows = resize_matrix(h, new_h, antialias)[top:top + size]
    cols = resize_matrix(w, new_w, antialias)[left:left + size]
    x = _apply_resize(images, jnp.asarray(rows), jnp.asarray(cols))
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------------------------------------
# The interface and the registry
# ---------------------------------------------------------------------------------------------

class Reward(Protocol):
    """What ReFL needs from a reward: a pure, differentiable r(params, images, batch) -> [B]."""

    name: str

    def __call__(self, params: Params, images: jax.Array, batch: Batch | None = None) -> jax.Array: ...

    def init_params(self, seed: int = 0) -> Params: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: make ``make_reward(name, **kwargs)`` call the decorated factory."""
    def add(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        _REGISTRY[name] = factory
        return factory
    return add


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def make_reward(name: str, **kwargs: Any) -> Reward:
    """The reward called ``name`` (see ``available_rewards()``), configured by ``kwargs``."""
    if name not in _REGISTRY:
        raise SafeJaxError(f"unknown reward '{name}' (known: {', '.join(available_rewards())})")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:  # an unknown or missing keyword: say which reward it was for
        raise SafeJaxError(f"reward '{name}': {e}") from None


def _check_images(images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SafeJaxError(f"reward: images must be [B, H, W, 3] in [0, 1], got {tuple(images.shape)}")


def _need(batch: Batch | None, reward: str, *keys: str) -> str:
    """The first of ``keys`` present in ``batch``; a clear error when none is."""
    for key in keys:
        if batch is not None and key in batch:
            return key
    raise SafeJaxError(f"reward '{reward}' needs batch[{' or '.join(repr(k) for k in keys)}]")


# ---------------------------------------------------------------------------------------------
# Pixel rewards
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Brightness:
    """r = mean pixel value over H, W and channels: [B]. No parameters."""

    name: str = "brightness"

    def __call__(self, params: Params, images: jax.Array, batch: Batch | None = None) -> jax.Array:
        _check_images(images)
        return jnp.mean(images.astype(jnp.float32), axis=(1, 2, 3))

    def init_params(self, seed: int = 0) -> Params:
        return {}


@dataclass(frozen=True)
class TargetColour:
    """r = −‖mean colour − target‖₂ (maximum 0 at the target; gradient 0 there, not NaN)."""

    target: tuple[float, float, float]
    name: str = "target_colour"

    def __post_init__(self):
        try:
            target = tuple(float(v) for v in self.target)
        except (TypeError, ValueError):
            target = ()
        if len(target) != 3:
            raise SafeJaxError(f"target_colour: target must be three numbers (r, g, b) in [0, 1], got {self.target!r}")
        object.__setattr__(self, "target", target)

    def __call__(self, params: Params, images: jax.Array, batch: Batch | None = None) -> jax.Array:
        _check_images(images)
        diff = jnp.mean(images.astype(jnp.float32), axis=(1, 2)) - jnp.asarray(self.target, jnp.float32)
        squared = jnp.sum(diff * diff, axis=-1)
        positive = squared > 0
        return -jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)

    def init_params(self, seed: int = 0) -> Params:
        return {}


@register_reward("brightness")
def _brightness() -> Reward:
    return Brightness()


@register_reward("target_colour")
@register_reward("target_color")
def _target_colour(target: Sequence[float]) -> Reward:
    return TargetColour(tuple(target))


# ---------------------------------------------------------------------------------------------
# CLIP rewards
# ---------------------------------------------------------------------------------------------

SCORES = ("pickscore", "clipscore", "cosine")


@dataclass(frozen=True)
class CLIPReward:
    """A CLIP caption score, optionally plus α · image alignment with the ground truth (DFE, ours).

    ``params`` is the ``CLIPModel`` parameter tree (``load_clip_reward`` / ``init_params``).
    ``r = s(cos(f(x̂0), g(caption))) + α · cos(f(x̂0), f(x_gt))`` where ``s`` is ``score``:
    ``pickscore`` exp(logit_scale)·cos, ``clipscore`` ``clipscore_weight``·max(cos, 0), ``cosine``
    cos. With ``alpha == 0`` the image term is not computed and ``gt_images`` is not needed.
    """

    model: CLIPModel
    score: str = "pickscore"
    alpha: float = 0.0
    clipscore_weight: float = 2.5
    antialias: bool = True
    name: str = "clip_score"

    def __post_init__(self):
        if self.score not in SCORES:
            raise SafeJaxError(f"{self.name}: unknown score '{self.score}' (known: {', '.join(SCORES)})")
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [0, 1] -> CLIP-normalised [B, S, S, 3], S = the model's image size."""
        _check_images(images)
        return preprocess(images, self.image_size, antialias=self.antialias)

    def image_embeds(self, params: Params, images: jax.Array) -> jax.Array:
        """Unit-norm CLIP image embeddings [B, P] (fp32) of images in [0, 1] of any size."""
        features = self.model.apply({"params": params}, self.preprocess(images), method="get_image_features")
        return l2_normalise(features)

    def text_embeds(self, params: Params, input_ids: jax.Array) -> jax.Array:
        """Unit-norm CLIP text embeddings [B, P] (fp32) of token ids [B, T]."""
        features = self.model.apply({"params": params}, jnp.asarray(input_ids), method="get_text_features")
        return l2_normalise(features)

    def image_similarity(self, params: Params, images: jax.Array, others: jax.Array) -> jax.Array:
        """cos(f(images[i]), f(others[i])): [B], 1 for an image and itself."""
        return jnp.sum(self.image_embeds(params, images) * self.image_embeds(params, others), axis=-1)

    def caption_cosine(self, params: Params, images: jax.Array, batch: Batch) -> jax.Array:
        key = _need(batch, self.name, "text_embeds", "input_ids")
        text = batch[key] if key == "text_embeds" else self.text_embeds(params, batch[key])
        return jnp.sum(self.image_embeds(params, images) * jax.lax.stop_gradient(text), axis=-1)

    def caption_score(self, params: Params, images: jax.Array, batch: Batch) -> jax.Array:
        """The caption term alone: [B]."""
        cos = self.caption_cosine(params, images, batch)
        if self.score == "pickscore":
            return jnp.exp(params["logit_scale"].astype(jnp.float32)) * cos
        if self.score == "clipscore":
            return self.clipscore_weight * jnp.maximum(cos, 0.0)
        return cos

    def __call__(self, params: Params, images: jax.Array, batch: Batch | None = None) -> jax.Array:
        batch = batch or {}
        reward = self.caption_score(params, images, batch)
        if self.alpha != 0.0:
            key = _need(batch, self.name, "gt_image_embeds", "gt_images")
            gt = batch[key] if key == "gt_image_embeds" else self.image_embeds(params, batch[key])
            reward = reward + self.alpha * jnp.sum(self.image_embeds(params, images) * jax.lax.stop_gradient(gt), -1)
        return reward.astype(jnp.float32)

    def init_params(self, seed: int = 0) -> Params:
        """Random CLIP weights (host-drawn, no compile): for tests and the demo."""
        return clip_init_params(self.model, seed)


def _clip_model(clip: str | CLIPConfig | CLIPModel, dtype: Any, param_dtype: Any, attention_impl: Any,
                remat_policy: str | None) -> CLIPModel:
    if isinstance(clip, CLIPModel):
        return clip
    if isinstance(clip, str) and Path(clip).is_dir():
        raise SafeJaxError(f"clip={clip!r} is a folder: use load_clip_reward(folder, name) to load its weights")
    config = clip_preset(clip) if isinstance(clip, str) else clip
    if not isinstance(config, CLIPConfig):
        raise SafeJaxError(f"clip must be a preset name, a CLIPConfig or a CLIPModel, got {type(clip).__name__}")
    return CLIPModel(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                     remat_policy=remat_policy)


@register_reward("clip_score")
def _clip_score(clip: str | CLIPConfig | CLIPModel = "tiny", score: str = "pickscore", *,
                clipscore_weight: float = 2.5, antialias: bool = True, dtype: Any = jnp.float32,
                param_dtype: Any = jnp.float32, attention_impl: Any = None, remat_policy: str | None = None,
                name: str = "clip_score", alpha: float = 0.0) -> CLIPReward:
    model = _clip_model(clip, dtype, param_dtype, attention_impl, remat_policy)
    return CLIPReward(model, score=score, alpha=alpha, clipscore_weight=clipscore_weight, antialias=antialias,
                      name=name)


@register_reward("pickscore")
def _pickscore(clip: str | CLIPConfig | CLIPModel = "tiny", **kwargs: Any) -> CLIPReward:
    return _clip_score(clip, "pickscore", name="pickscore", **kwargs)


@register_reward("clipscore")
def _clipscore(clip: str | CLIPConfig | CLIPModel = "tiny", **kwargs: Any) -> CLIPReward:
    return _clip_score(clip, "clipscore", name="clipscore", **kwargs)


@register_reward("dfe")
def _dfe(clip: str | CLIPConfig | CLIPModel = "tiny", alpha: float = 1.0, score: str = "pickscore",
         **kwargs: Any) -> CLIPReward:
    """DFE reward, our design: caption score + α · cos(f(x̂0), f(x_gt))."""
    return _clip_score(clip, score, alpha=alpha, name="dfe", **kwargs)


CLIP_REWARDS = ("clip_score", "pickscore", "clipscore", "dfe")  # the rewards a CLIP model computes


# ---------------------------------------------------------------------------------------------
# Preference-model rewards: HPS v2 and ImageReward
# ---------------------------------------------------------------------------------------------

# The rewards read from one checkpoint file, and the architecture each assumes when none is named
# (the file's shapes do not fix it): an OpenCLIP model name for HPS, a BLIP vision preset for ImageReward.
REWARD_MODELS = {"hps": "ViT-H-14", "imagereward": "large"}


def reward_archs(name: str) -> tuple[str, ...]:
    """The architecture names ``load_reward_checkpoint(name, ..., arch)`` accepts, read at call
    time so that architectures registered later (``OPEN_CLIP_ARCHS``, ``VISION_PRESETS``) count."""
    if name == "hps":
        from safe_jax.io.open_clip import OPEN_CLIP_ARCHS

        return tuple(OPEN_CLIP_ARCHS)
    if name == "imagereward":
        from safe_jax.models.blip import VISION_PRESETS

        return tuple(VISION_PRESETS)
    raise SafeJaxError(f"reward '{name}' is not read from a checkpoint (those are: {', '.join(REWARD_MODELS)})")


@register_reward("hps")
def _hps(model: str | CLIPConfig | CLIPModel = "tiny", *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
         attention_impl: Any = None, remat_policy: str | None = None) -> Reward:
    from safe_jax.eval.hps import HPSReward  # lazily: the eval package imports this module

    return HPSReward(_clip_model(model, dtype, param_dtype, attention_impl, remat_policy))


@register_reward("imagereward")
def _imagereward(model: Any = "tiny", *, antialias: bool = True, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attention_impl: Any = None,
                 remat_policy: str | None = None) -> Reward:
    """``model``: an ``ImageRewardModel``, an ``ImageRewardConfig`` or a preset name (random
    weights from ``init_params``; ``load_reward_checkpoint`` reads real ones)."""
    from safe_jax.io.image_reward import ImageRewardReward
    from safe_jax.models import blip

    if not isinstance(model, blip.ImageRewardModel):
        config = blip.preset(model) if isinstance(model, str) else model
        if not isinstance(config, blip.ImageRewardConfig):
            raise SafeJaxError("imagereward: model must be a preset name, an ImageRewardConfig or an "
                               f"ImageRewardModel, got {type(model).__name__}")
        model = blip.ImageRewardModel(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                      remat_policy=remat_policy)
    return ImageRewardReward(model, antialias=antialias)


def load_reward_checkpoint(name: str, checkpoint: str | Path, arch: str = "", **kwargs: Any
                           ) -> tuple[Reward, Params, Callable[[str], dict[str, np.ndarray]]]:
    """(reward, params, text) of an HPS v2 / ImageReward checkpoint file.

    ``arch`` ("" for ``REWARD_MODELS``' default) names what the file's shapes leave open.
    ``text`` turns one caption into the reward's own token arrays (``reward_input_ids``, and
    ``reward_attention_mask`` for ImageReward): the input pipeline adds them to every record,
    because the SD tokenizer's ids differ from what these models were trained on (BERT's
    vocabulary for ImageReward; for HPS, OpenCLIP's caption cleaning, and no subject prefix).
    ``kwargs`` go to the loader (``load_hps`` / ``load_image_reward``: dtype, attention_impl, ...).
    """
    if name not in REWARD_MODELS:
        raise SafeJaxError(f"load_reward_checkpoint: '{name}' is not read from a checkpoint "
                           f"(those are: {', '.join(REWARD_MODELS)})")
    arch = arch or REWARD_MODELS[name]
    if name == "hps":
        from safe_jax.eval import hps

        model, params = hps.load_hps(checkpoint, arch, **kwargs)
        return make_reward("hps", model=model), params, hps.HPSText(model.config.text.max_position_embeddings)
    from safe_jax.io import image_reward

    model, params, tokenizer = image_reward.load_image_reward(checkpoint, vision=arch, **kwargs)
    return make_reward("imagereward", model=model), params, image_reward.ImageRewardText(tokenizer)


def text_batch(text: Callable[[str], Mapping[str, Any]] | None, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """A reward's ``text`` transform over ``captions``, stacked into batch arrays ({} without one)."""
    if text is None:
        return {}
    rows = [text(caption) for caption in captions]
    return {key: np.stack([np.asarray(row[key]) for row in rows]) for key in (rows[0] if rows else {})}


def load_clip_reward(folder: str | Path, name: str = "clip_score", *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, attention_impl: Any = None,
                     remat_policy: str | None = None, **kwargs: Any) -> tuple[CLIPReward, Params]:
    """(reward, params) for a transformers ``CLIPModel`` folder and a CLIP reward ``name``
    (``clip_score``, ``pickscore``, ``clipscore`` or ``dfe``; ``kwargs`` configure it)."""
    if name not in CLIP_REWARDS:
        raise SafeJaxError(f"load_clip_reward: '{name}' is not a CLIP reward (clip_score, pickscore, clipscore, dfe)")
    model, params = load_clip(folder, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                              remat_policy=remat_policy)
    return make_reward(name, clip=model, **kwargs), params


def clip_tokenizer(folder: str | Path | None = None):
    """The tokenizer for a CLIP reward's ``input_ids``: ``folder``'s own when it holds one
    (tokenizer.json, or vocab.json + merges.txt), otherwise OpenAI CLIP's BPE (bundled, offline).
    Tokenise with ``safe_jax.text.tokenizer.tokenize(tok, captions)`` (77 tokens, padded)."""
    from safe_jax.text import tokenizer as tok

    if folder is not None:
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return tok.load_tokenizer(folder)
    return tok.tiny_tokenizer()
