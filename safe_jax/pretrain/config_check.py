"""Checks of a pre-training config (``launch/configs/world_*.py``), before anything is drawn or compiled.

    validate(config)   # SafeJaxError naming the field: "config.model.layers_per_block must be ≥ 1, got 0"

Every field is checked (its type, its range or its choices), a field the task does not have is
refused (a typo would otherwise be ignored), and so is a missing one; then how fields fit together
(the image size against the VAE's downscale and the CLIP patch size, norm groups against widths,
the folders a UNet run starts from).
"""

from __future__ import annotations

import difflib
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping

from safe_jax.errors import SafeJaxError
from safe_jax.pretrain.data import HELD_OUT_SEED
from safe_jax.sampling import SAMPLERS
from safe_jax.train.config_check import (
    _check_writable,  # the workdir probe training uses
)

Check = Callable[[Any], "str | None"]  # None when the value is good, else what is wrong


def _int(low: int = 0, high: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            return f"must be an integer, got {v!r}"
        if v < low:
            return f"must be ≥ {low}, got {v}"
        if high is not None and v >= high:
            return f"must be < {high}, got {v}"
        return None
    return check


def _number(low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
            optional: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            return f"must be a finite number{' or None' if optional else ''}, got {v!r}"
        if v < low or (low_open and v == low):
            return f"must be {'>' if low_open else '≥'} {low:g}, got {v:g}"
        if v > high or (high_open and v == high):
            return f"must be {'<' if high_open else '≤'} {high:g}, got {v:g}"
        return None
    return check


def _ints(low: int = 1) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not v or any(
                isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low for x in v):
            return f"must be a non-empty list of integers ≥ {low}, got {v!r}"
        return None
    return check


def _choice(*options: str) -> Check:
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}, got {v!r}"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, got {v!r}"


def _nonempty(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


COMMON: dict[str, Check] = {
    "task": _choice("vae", "clip", "unet"),
    "workdir": _nonempty,
    "seed": _int(0),
    "steps": _int(1),
    "data.seed": _int(0, HELD_OUT_SEED),
    "data.image_size": _int(16),
    "data.batch_size": _int(2),
    "data.prefetch": _int(0),
    "optim.lr": _number(low_open=True, high=1.0),
    "optim.schedule": _choice("cosine", "constant"),
    "optim.warmup_steps": _int(0),
    "optim.weight_decay": _number(),
    "optim.clip_norm": _number(),
    "optim.b2": _number(high=1.0, low_open=True, high_open=True),
    "optim.ema_decay": _number(high=1.0, high_open=True, optional=True),
    "checkpoint.every": _int(1),
    "checkpoint.keep": _int(1),
    "log_every": _int(1),
    "eval_every": _int(0),
    "eval_examples": _int(2),
    "export.dir": _string,
    "export.dtype": _choice("float32", "float16", "bfloat16"),
}

TASKS: dict[str, dict[str, Check]] = {
    "vae": {
        "model.block_out_channels": _ints(),
        "model.layers_per_block": _int(1),
        "model.latent_channels": _int(1),
        "model.norm_num_groups": _int(1),
        "loss.kl_weight": _number(),
        "loss.gradient_weight": _number(),
    },
    "clip": {
        **{f"model.{tower}.{k}": _int(1) for tower in ("text", "vision")
           for k in ("hidden_size", "layers", "heads", "mlp_size")},
        "model.vision.patch_size": _int(1),
        "model.projection_dim": _int(1),
        "model.max_length": _int(8),
        "loss.subject_prompt_rate": _number(high=1.0),
        "vocab_examples": _int(1),
    },
    "unet": {
        "vae": _nonempty,
        "text": _nonempty,
        "model.block_out_channels": _ints(),
        "model.layers_per_block": _int(1),
        "model.attention_heads": _ints(),
        "model.norm_num_groups": _int(1),
        "loss.cond_dropout": _number(high=1.0, high_open=True),
        "loss.min_snr_gamma": _number(low_open=True, optional=True),
        "sample.count": _int(0),
        "sample.steps": _int(1),
        "sample.guidance": _number(),
        "sample.scheduler": _choice(*SAMPLERS),
    },
}


def validate(config: Any) -> None:
    """Raise ``SafeJaxError`` naming the first bad field of ``config``."""
    fields = _flatten(config)
    task = fields.get("task")
    problem = COMMON["task"](task)
    if problem:
        raise SafeJaxError(f"config.task {problem}")
    spec = {**COMMON, **TASKS[task]}
    for path in fields:
        if path not in spec:
            near = difflib.get_close_matches(path, list(spec), n=1)
            raise SafeJaxError(f"config.{path} is not a field of a {task} config"
                               + (f" (did you mean config.{near[0]}?)" if near else ""))
    for path, check in spec.items():
        if path not in fields:
            raise SafeJaxError(f"config.{path} is missing (see launch/configs/world_{task}*.py)")
        problem = check(fields[path])
        if problem:
            raise SafeJaxError(f"config.{path} {problem}")
    {"vae": _vae, "clip": _clip, "unet": _unet}[task](fields.get)
    _check_writable("config.workdir", fields["workdir"])
    if fields["export.dir"]:
        _check_writable("config.export.dir", fields["export.dir"])



def _groups(c: Callable[[str], Any], channels: list[int]) -> None:
    groups = c("model.norm_num_groups")
    bad = [w for w in channels if w % groups]
    if bad:
        raise SafeJaxError(f"config.model.norm_num_groups ({groups}) must divide every width of "
                           f"config.model.block_out_channels, not {bad[0]}")


def _vae(c: Callable[[str], Any]) -> None:
    channels = list(c("model.block_out_channels"))
    _groups(c, channels)
    downscale = 2 ** (len(channels) - 1)
    if c("data.image_size") % downscale:
        raise SafeJaxError(f"config.data.image_size ({c('data.image_size')}) must be a multiple of the VAE's "
                           f"downscale {downscale} (2 ** (len(block_out_channels) - 1))")


def _clip(c: Callable[[str], Any]) -> None:
    for tower in ("text", "vision"):
        width, heads = c(f"model.{tower}.hidden_size"), c(f"model.{tower}.heads")
        if width % heads:
            raise SafeJaxError(f"config.model.{tower}.hidden_size ({width}) must be a multiple of "
                               f"config.model.{tower}.heads ({heads})")
    if c("data.image_size") % c("model.vision.patch_size"):
        raise SafeJaxError(f"config.model.vision.patch_size ({c('model.vision.patch_size')}) must divide "
                           f"config.data.image_size ({c('data.image_size')})")


def _unet(c: Callable[[str], Any]) -> None:
    channels = list(c("model.block_out_channels"))
    _groups(c, channels)
    if len(c("model.attention_heads")) != len(channels):
        raise SafeJaxError(f"config.model.attention_heads needs one entry per block ({len(channels)}), "
                           f"got {list(c('model.attention_heads'))}")
    for field, needs in (("vae", "config.json"), ("text", "config.json")):
        folder = Path(c(field))
        if not (folder / needs).is_file():
            what = "an AutoencoderKL folder (the world_vae run's export)" if field == "vae" else \
                "a CLIPModel folder (the world_clip_reward run's export)"
            raise SafeJaxError(f"config.{field}: {folder} is not {what}: no {needs}")


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(tree, Mapping):
        raise SafeJaxError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
