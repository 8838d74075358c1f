"""ImageReward checkpoints read into our Flax model, and its inputs prepared as the reference does.

The released model is one PyTorch state dict, ``ImageReward.pt``, plus BLIP's ``med_config.json``;
the reference code downloads bert-base-uncased's tokenizer at run time, which we never do. The
layout we read, all beside each other by default:

    ImageReward.pt            (or a .safetensors file with the same tensor names)
    med_config.json
    tokenizer/                bert-base-uncased's tokenizer files (vocab.txt, or tokenizer.json);
                              a folder named bert-base-uncased/ is accepted instead

BLIP's tokenizer is bert-base-uncased plus two added special tokens, [DEC] (as BOS) and [ENC];
``load_tokenizer`` adds them the same way, so prompts that contain those strings tokenise as
in the reference. ``ImageReward.score`` does not replace the leading [CLS] by [ENC] (BLIP's image-
grounded text encoder does that elsewhere; ImageReward was trained without it), so neither do we.

Two image paths, for two purposes:

- ``preprocess_images``: uint8 pixels -> model input exactly as ``ImageReward.preprocess``
  computes it on a PIL image (PIL bicubic resize of the shorter side, centre crop, CLIP mean/std):
  for the metric, whose values must match the reference's.
- ``imagereward_reward``: images in [0, 1] -> reward, differentiably (bicubic resize in JAX, no
  uint8 rounding), as ImageReward's ReFL code resizes its decoded tensors: for fine-tuning
  (``ImageRewardReward``, the registry's ``imagereward``; ``ImageRewardText`` tokenises the
  captions in the input pipeline).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from safe_jax.errors import SafeJaxError
from safe_jax.eval.preprocess import CLIP_MEAN, CLIP_STD, normalise, resize_shorter_crop
from safe_jax.io import folders
from safe_jax.io.random_init import random_params
from safe_jax.models import blip
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.blip import MAX_LENGTH, BLIPVisionConfig, ImageRewardConfig, ImageRewardModel, MEDConfig

TOKENIZER_FOLDERS = ("tokenizer", "bert-base-uncased")
BLIP_SPECIAL_TOKENS = ({"bos_token": "[DEC]"}, {"additional_special_tokens": ["[ENC]"]})  # in BLIP's order


def _regular_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise SafeJaxError(f"missing {what}: {path}")
    if not path.is_file():
        raise SafeJaxError(f"{what} {path} is not a regular file")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of ``ImageReward.pt`` (``torch.load(weights_only=True)``, which refuses pickled
    code) or of a ``.safetensors`` file, as numpy arrays keyed by their PyTorch names."""
    path = _regular_file(Path(path), "ImageReward checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise SafeJaxError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None
    try:
        import torch
    except ImportError:
        raise SafeJaxError(f"{path} is a PyTorch checkpoint: install torch to read it, or convert it to "
                           "safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SafeJaxError(f"cannot read {path} safely (weights_only=True): {message}") from None
    if not isinstance(state, Mapping):
        raise SafeJaxError(f"{path} does not hold a state dict (a mapping of tensor names to tensors), "
                           f"but a {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SafeJaxError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach()
        out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out


def read_med_config(path: str | os.PathLike) -> MEDConfig:
    path = _regular_file(Path(path), "med_config.json")
    return MEDConfig.from_med_config(folders.read_json(path), str(path))


def _vision(vision: str | BLIPVisionConfig) -> BLIPVisionConfig:
    if isinstance(vision, BLIPVisionConfig):
        return vision
    if isinstance(vision, str) and vision in blip.VISION_PRESETS:
        return blip.VISION_PRESETS[vision]
    raise SafeJaxError(f"vision must be a BLIPVisionConfig or one of {', '.join(blip.VISION_PRESETS)}, "
                       f"got {vision!r}")


def load_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None):
    """BLIP's tokenizer: the BERT tokenizer saved in ``folder`` plus [DEC] and [ENC], added as
    BLIP's ``init_tokenizer`` adds them. ``vocab_size`` (the text encoder's) bounds its ids."""
    from transformers import BertTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise SafeJaxError(f"BERT tokenizer folder {folder} does not exist")
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise SafeJaxError(f"BERT tokenizer folder {folder} has neither vocab.txt nor tokenizer.json")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise SafeJaxError(f"cannot load the BERT tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    for tokens in BLIP_SPECIAL_TOKENS:
        tokenizer.add_special_tokens(tokens)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise SafeJaxError(f"BERT tokenizer in {folder} has {len(tokenizer)} tokens (with [DEC] and [ENC]) but the "
                           f"text encoder's vocab_size is {vocab_size}")
    return tokenizer


def _default_tokenizer(checkpoint: Path) -> Path:
    for name in TOKENIZER_FOLDERS:
        if (checkpoint.parent / name).is_dir():
            return checkpoint.parent / name
    raise SafeJaxError(f"no BERT tokenizer beside {checkpoint}: put bert-base-uncased's tokenizer files "
                       f"(vocab.txt) in {checkpoint.parent / TOKENIZER_FOLDERS[0]}, or pass tokenizer=FOLDER")


def load_image_reward(checkpoint: str | os.PathLike, med_config: str | os.PathLike | None = None,
                      tokenizer: str | os.PathLike | None = None, *, vision: str | BLIPVisionConfig = "large",
                      dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                      attention_impl: AttentionImpl = None, remat_policy: str | None = None
                      ) -> tuple[ImageRewardModel, dict[str, Any], Any]:
    """(model, params, tokenizer) from an ImageReward checkpoint.

    ``med_config`` and ``tokenizer`` default to ``med_config.json`` and ``tokenizer/`` (or
    ``bert-base-uncased/``) beside ``checkpoint``. ``vision`` is the ViT's architecture, which the
    reference fixes in code (``"large"``: ViT-L/16 at 224). ``dtype`` is the compute dtype,
    ``param_dtype`` the one the weights are stored in. Tensors that ImageReward never uses are
    dropped (see ``safe_jax.models.blip``); any other missing, extra or mis-shaped tensor is a
    SafeJaxError naming it and the file.
    """
    checkpoint = Path(checkpoint)
    _regular_file(checkpoint, "ImageReward checkpoint")
    text = read_med_config(checkpoint.parent / "med_config.json" if med_config is None else Path(med_config))
    config = ImageRewardConfig(text=text, vision=_vision(vision))
    model = ImageRewardModel(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                             remat_policy=remat_policy)
    tok = load_tokenizer(_default_tokenizer(checkpoint) if tokenizer is None else tokenizer, text.vocab_size)
    params = blip.from_state_dict(read_state_dict(checkpoint), model, dtype=param_dtype, what=str(checkpoint))
    return model, params, tok


def init_params(model: ImageRewardModel, seed: int = 0) -> dict[str, Any]:
    """Random weights for ``model`` (``random_init``): tests and demos without a checkpoint."""
    return random_params(blip.abstract_params(model), seed)


def tokenize(tokenizer, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 [B, 35]: what ``ImageReward.score`` feeds its text
    encoder (padded to 35 tokens, truncated, the [CLS] id first)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise SafeJaxError("ImageReward prompts must be strings")
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


@dataclass(frozen=True)
class ImageRewardText:
    """caption -> ``{"reward_input_ids", "reward_attention_mask"}`` (int32 [35] each), as ``tokenize``
    gives them: the input pipeline's per-record text transform for the ImageReward reward, which
    reads BERT ids where the batch's ``input_ids`` are CLIP's. Picklable, for grain's worker
    processes; it keeps the tokenizer so that the reward itself holds only the (hashable) model."""

    tokenizer: Any

    def __call__(self, caption: str) -> dict[str, np.ndarray]:
        input_ids, attention_mask = tokenize(self.tokenizer, caption)
        return {"reward_input_ids": input_ids[0], "reward_attention_mask": attention_mask[0]}


def preprocess_images(images: np.ndarray | Sequence[np.ndarray | Image.Image], size: int = 224) -> np.ndarray:
    """uint8 RGB images -> float32 [B, size, size, 3], as ``ImageReward.preprocess`` does:
    ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on the PIL image, ``ToTensor``, ``Normalize``
    with CLIP's mean and std (NHWC here).

    ``images``: a uint8 [B, H, W, 3] array or a sequence of uint8 [H, W, 3] arrays or RGB PIL
    images (sizes may differ). PIL images of other modes are refused: the reference resizes them
    in their own mode before converting to RGB (palette images with nearest neighbour, RGBA with
    premultiplied alpha), which we do not reproduce.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image) and image.mode != "RGB":
            raise SafeJaxError(f"image {i}: PIL mode {image.mode!r}; ImageReward's preprocessing is reproduced for "
                               "RGB images only")
        try:
            out.append(normalise(resize_shorter_crop(image, size), CLIP_MEAN, CLIP_STD))
        except ValueError as e:
            raise SafeJaxError(f"image {i}: {e}") from None
    if not out:
        raise SafeJaxError("no images to preprocess")
    return np.stack(out).astype(np.float32)


def imagereward_reward(model: ImageRewardModel, params: Mapping[str, Any], images01: jax.Array,
                       input_ids: jax.Array, attention_mask: jax.Array, *, antialias: bool = True) -> jax.Array:
    """The ImageReward reward [B] (float32) of images in [0, 1] ([B, H, W, 3], any size),
    differentiable with respect to ``images01``: bicubic resize of the shorter side to the ViT's
    size, centre crop and CLIP normalisation in JAX (``safe_jax.train.rewards.preprocess``), then
    the model. Equals the metric path up to the uint8 rounding that the PIL path applies.
    ``antialias=False`` reproduces ReFL's resize under torchvision < 0.17."""
    # Imported here: the reward registry in safe_jax.train.rewards imports this module.
    from safe_jax.train.rewards import preprocess

    if images01.ndim != 4 or images01.shape[-1] != 3:
        raise SafeJaxError(f"images must be [B, H, W, 3] in [0, 1], got {tuple(images01.shape)}")
    pixels = preprocess(images01, model.config.vision.image_size, antialias=antialias)
    return model.apply({"params": params}, pixels, jnp.asarray(input_ids), jnp.asarray(attention_mask))


@dataclass(frozen=True)
class ImageRewardReward:
    """ImageReward as a ReFL reward, ``safe_jax.train.rewards``' interface: ``reward(params, images,
    batch) -> [B]`` (``imagereward_reward``) with the captions' BERT tokens in
    ``batch["reward_input_ids"]`` / ``batch["reward_attention_mask"]`` (``ImageRewardText``)."""

    model: ImageRewardModel
    antialias: bool = True
    name: str = "imagereward"

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def __call__(self, params: Mapping[str, Any], images: jax.Array, batch: Mapping[str, Any] | None = None
                 ) -> jax.Array:
        batch = batch or {}
        if "reward_input_ids" not in batch or "reward_attention_mask" not in batch:
            raise SafeJaxError(f"reward '{self.name}' needs batch['reward_input_ids'] and "
                               "batch['reward_attention_mask'] (the captions through ImageRewardText)")
        return imagereward_reward(self.model, params, images, batch["reward_input_ids"],
                                  batch["reward_attention_mask"], antialias=self.antialias)

    def init_params(self, seed: int = 0) -> dict[str, Any]:
        """Random weights (tests, the demo): ``load_image_reward`` gives the real ones."""
        return init_params(self.model, seed)


def score(model: ImageRewardModel, params: Mapping[str, Any], tokenizer, images, prompts: str | Sequence[str]
          ) -> np.ndarray:
    """The ImageReward metric: one prompt per image (or one prompt for all), float32 [B], as
    ``ImageReward.score`` computes each (``inference_rank`` for one prompt and several images)."""
    pixels = preprocess_images(images, model.config.vision.image_size)
    prompts = [prompts] * len(pixels) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(pixels):
        raise SafeJaxError(f"{len(pixels)} images but {len(prompts)} prompts")
    input_ids, attention_mask = tokenize(tokenizer, prompts)
    return np.asarray(_apply(model, params, pixels, input_ids, attention_mask))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, pixels, input_ids, attention_mask):
    return model.apply({"params": params}, pixels, input_ids, attention_mask)
