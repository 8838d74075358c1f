"""Checks of a pre-training config (``launch/configs/world_*.py``), before anything is drawn or compiled.

    validate(config)   # SafeJaxError naming the field: "config.model.layers_per_block must be ≥ 1, got 0"

Every field is checked (its type, its range or its choices), a field the task does not have is
refused (a typo would otherwise be ignored), and so is a missing one; then how fields fit together
(the image size against the VAE's downscale and the CLIP patch size, norm groups against widths,
the folders a UNet run starts from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from safe_jax.config_fields import (
    Check,
    check_fields,
    check_writable,
    choice,
    flatten,
    integer,
    integers,
    number,
    string,
)
from safe_jax.errors import SafeJaxError
from safe_jax.pretrain.data import HELD_OUT_SEED
from safe_jax.sampling import SAMPLERS

_nonempty = string(nonempty=True)

COMMON: dict[str, Check] = {
    "task": choice("vae", "clip", "unet"),
    "workdir": _nonempty,
    "seed": integer(0),
    "steps": integer(1),
    "data.seed": integer(0, below=HELD_OUT_SEED),
    "data.image_size": integer(16),
    "data.batch_size": integer(2),
    "data.prefetch": integer(0),
    "optim.lr": number(0, 1, low_open=True),
    "optim.schedule": choice("cosine", "constant"),
    "optim.warmup_steps": integer(0),
    "optim.weight_decay": number(0),
    "optim.clip_norm": number(0),
    "optim.b2": number(0, 1, low_open=True, high_open=True),
    "optim.ema_decay": number(0, 1, high_open=True, optional=True),
    "checkpoint.every": integer(1),
    "checkpoint.keep": integer(1),
    "log_every": integer(1),
    "eval_every": integer(0),
    "eval_examples": integer(2),
    "export.dir": string(),
    "export.dtype": choice("float32", "float16", "bfloat16"),
}

TASKS: dict[str, dict[str, Check]] = {
    "vae": {
        "model.block_out_channels": integers(),
        "model.layers_per_block": integer(1),
        "model.latent_channels": integer(1),
        "model.norm_num_groups": integer(1),
        "loss.kl_weight": number(0),
        "loss.gradient_weight": number(0),
    },
    "clip": {
        **{f"model.{tower}.{k}": integer(1) for tower in ("text", "vision")
           for k in ("hidden_size", "layers", "heads", "mlp_size")},
        "model.vision.patch_size": integer(1),
        "model.projection_dim": integer(1),
        "model.max_length": integer(8),
        "loss.subject_prompt_rate": number(0, 1),
        "vocab_examples": integer(1),
    },
    "unet": {
        "vae": _nonempty,
        "text": _nonempty,
        "model.block_out_channels": integers(),
        "model.layers_per_block": integer(1),
        "model.attention_heads": integers(),
        "model.norm_num_groups": integer(1),
        "loss.cond_dropout": number(0, 1, high_open=True),
        "loss.min_snr_gamma": number(0, low_open=True, optional=True),
        "sample.count": integer(0),
        "sample.steps": integer(1),
        "sample.guidance": number(0),
        "sample.scheduler": choice(*SAMPLERS),
    },
}


def validate(config: Any) -> None:
    """Raise ``SafeJaxError`` naming the first bad field of ``config``."""
    fields = flatten(config)
    task = fields.get("task")
    problem = COMMON["task"](task)
    if problem:
        raise SafeJaxError(f"config.task {problem}")
    check_fields(fields, {**COMMON, **TASKS[task]}, unknown=f"a field of a {task} config",
                 defaults=f"launch/configs/world_{task}*.py")
    {"vae": _vae, "clip": _clip, "unet": _unet}[task](fields.get)
    check_writable("config.workdir", fields["workdir"])
    if fields["export.dir"]:
        check_writable("config.export.dir", fields["export.dir"])


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
