"""Checks of a training config (``launch/configs/base.py``'s fields), before anything is loaded or compiled.

    validate_config(config)   # SafeJaxError naming the field: "config.checkpoint.every must be ≥ 1, got 0"

``train()`` calls it first, so a bad value fails in a second, not after the model load and the
compile. Every field of the base config is checked (its type, its range or its choices); a field
the base config does not have is refused (a typo would otherwise be ignored), and so is one it has
that the config lacks.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable

from safe_jax.config_fields import (
    Check,
    boolean,
    check_fields,
    check_writable,
    choice,
    flatten,
    integer,
    number,
    string,
)
from safe_jax.errors import SafeJaxError


def _mesh_size(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not (v >= 1 or v == -1):
        return f"must be a positive integer or -1 (the rest), got {v!r}"
    return None


def _prompts(v: Any) -> str | None:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
        return f"must be a list of non-empty strings, got {v!r}"
    return None


def _remat_policy(v: Any) -> str | None:
    import jax

    if not isinstance(v, str):
        return f"must be a string, got {v!r}"
    if v in ("", "none", "full") or hasattr(jax.checkpoint_policies, v):
        return None
    return f"must be '', 'full' or a jax.checkpoint_policies name, got {v!r}"


def _spec() -> dict[str, Check]:
    """Every field of ``launch/configs/base.py`` and its check."""
    from safe_jax.data.transforms import CROPS
    from safe_jax.sampling.schedulers import SAMPLERS
    from safe_jax.text.conditioning import FORMATS, METHODS
    from safe_jax.train import rewards

    return {
        "model": string(nonempty=True),
        "dtype": choice("", "float32", "bfloat16", "float16"),
        "attention_impl": choice("", "xla", "cudnn"),
        "remat_policy": _remat_policy,
        "workdir": string(nonempty=True),
        "seed": integer(low=0),
        "steps": integer(low=1),
        "mode": choice("lora", "full"),
        "lora_rank": integer(low=1),
        "lora_alpha": number(0, low_open=True, optional=True),
        "data.name": string(nonempty=True),
        "data.data_dir": string(nonempty=True, optional=True),
        "data.split": string(nonempty=True),
        "data.resolution": integer(low=8, multiple=8),
        "data.batch_size": integer(low=1),
        "data.crop": choice(*CROPS),
        "data.flip": boolean,
        "data.worker_count": integer(low=0),
        "data.read_threads": integer(low=0),
        "subjects.weight": number(0, low_open=True),
        "subjects.weighting": choice(*METHODS),
        "subjects.format": choice(*FORMATS),
        "subjects.max_downweighted": integer(low=1),
        "mesh.data": _mesh_size,
        "mesh.fsdp": _mesh_size,
        "mesh.tensor": _mesh_size,
        "loss.kind": choice("denoising", "refl", "both"),
        "loss.mix": choice("alternate", "weighted"),
        "loss.refl_weight": number(0),
        "loss.cond_dropout": number(0, 1),
        "loss.min_snr_gamma": number(0, low_open=True, optional=True),
        "loss.refl_steps": integer(low=1),
        "loss.refl_step_min": integer(low=0),
        "loss.refl_step_max": integer(low=0),
        "loss.refl_lambda": number(),
        "loss.refl_grad_scale": number(0, low_open=True),
        "reward.name": choice(*rewards.available_rewards()),
        "reward.clip": string(nonempty=True),
        "reward.alpha": number(),
        "reward.checkpoint": string(),
        "reward.arch": string(),
        "optim.lr": number(0, low_open=True),
        "optim.schedule": choice("cosine", "constant"),
        "optim.warmup_steps": integer(low=0),
        "optim.weight_decay": number(0),
        "optim.clip_norm": number(0, optional=True),
        "optim.accumulate": integer(low=1),
        "optim.ema_decay": number(0, 1, high_open=True, optional=True),
        "nan_policy": choice("skip", "halt"),
        "checkpoint.every": integer(low=1),
        "checkpoint.keep": integer(low=1),
        "checkpoint.best_metric": string(),
        "checkpoint.best_mode": choice("min", "max"),
        "checkpoint.async_save": boolean,
        "log_every": integer(low=1),
        "peak_tflops": number(0, low_open=True, optional=True),
        "sample.every": integer(low=0),
        "sample.prompts": _prompts,
        "sample.steps": integer(low=1),
        "sample.guidance": number(),
        "sample.scheduler": choice(*SAMPLERS),
        "export.enabled": boolean,
        "export.dir": string(),
        "export.dtype": choice("float32", "float16", "bfloat16"),
        "export.use_ema": boolean,
    }


def validate_config(config: Any, *, devices: int | None = None, check_devices: bool = True) -> None:
    """Raise ``SafeJaxError`` naming the first bad field of ``config`` (a ConfigDict or nested mapping).

    With ``check_devices`` the mesh sizes are checked against ``devices`` (default: all of JAX's
    devices) and the batch size against the mesh and the number of processes; the launcher checks
    without them before JAX's distributed runtime is up.
    """
    fields = flatten(config)
    check_fields(fields, _spec())
    c = fields.get
    _cross_checks(c)
    if check_devices:
        _check_mesh(c, devices)
    check_writable("config.workdir", c("workdir"))
    if c("export.enabled"):
        check_writable("config.export.dir" if c("export.dir") else "config.workdir (its export folder)",
                       c("export.dir") or os.path.join(c("workdir"), "export"))


def _cross_checks(c: Callable[[str], Any]) -> None:
    from safe_jax.io import presets
    from safe_jax.train import rewards

    lo, hi, n = c("loss.refl_step_min"), c("loss.refl_step_max"), c("loss.refl_steps")
    if not lo <= hi < n:
        raise SafeJaxError(f"config.loss.refl_step_min ≤ config.loss.refl_step_max < config.loss.refl_steps "
                           f"must hold, got {lo}, {hi}, {n}")
    sizes = [c(f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")]
    if sizes.count(-1) > 1:
        raise SafeJaxError(f"at most one of config.mesh.data, config.mesh.fsdp, config.mesh.tensor may be -1 "
                           f"(the rest), got {', '.join(map(str, sizes))}")
    model = presets.resolve(c("model"))
    if model not in presets.PRESETS and not Path(model).is_dir():
        raise SafeJaxError(f"config.model must be a local diffusers folder or a preset "
                           f"({', '.join([*presets.PRESETS, *presets.SHIPPED])}), got {model!r}")
    if c("loss.kind") != "denoising" and c("reward.name") in rewards.CLIP_REWARDS:
        from safe_jax.models import clip_vision

        clip = presets.resolve(c("reward.clip"))
        if clip not in clip_vision.PRESETS and not Path(clip).is_dir():
            raise SafeJaxError(f"config.reward.clip must be a transformers CLIPModel folder or a preset "
                               f"({', '.join([*clip_vision.PRESETS, 'tiny-anchor-reward'])}), got {clip!r}")
    _check_reward_model(c)
    data_dir = c("data.data_dir")
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise SafeJaxError(f"config.data.data_dir {data_dir} is not a directory")
    if c("sample.every") and not c("sample.prompts"):
        raise SafeJaxError("config.sample.prompts must not be empty when config.sample.every > 0")
    if c("export.enabled") and c("export.use_ema") and c("optim.ema_decay") is None:
        raise SafeJaxError("config.export.use_ema needs EMA weights: set config.optim.ema_decay (e.g. 0.999)")


def _check_reward_model(c: Callable[[str], Any]) -> None:
    """HPS / ImageReward: the architecture name always (a typo costs nothing to catch), the files
    only when ReFL will read them (a denoising-only run never loads the reward)."""
    from safe_jax.train import rewards

    name = c("reward.name")
    if name not in rewards.REWARD_MODELS:
        return
    arch, known = c("reward.arch"), rewards.reward_archs(name)
    if arch and arch not in known:
        what = "an OpenCLIP architecture" if name == "hps" else "a BLIP vision preset"
        raise SafeJaxError(f"config.reward.arch must be '' ({rewards.REWARD_MODELS[name]}) or {what} for reward "
                           f"'{name}' ({', '.join(known)}), got {arch!r}")
    if c("loss.kind") == "denoising":
        return
    file = c("reward.checkpoint")
    wanted = "an HPS_v2*.pt file" if name == "hps" else "an ImageReward.pt file"
    if not file:
        raise SafeJaxError(f"config.reward.checkpoint must name {wanted} for reward '{name}'")
    path = Path(file)
    if not path.exists():
        raise SafeJaxError(f"config.reward.checkpoint {file} does not exist ({wanted} for reward '{name}')")
    if not path.is_file():
        raise SafeJaxError(f"config.reward.checkpoint {file} is not a regular file ({wanted} for reward '{name}')")
    if name == "imagereward":
        from safe_jax.io.image_reward import TOKENIZER_FOLDERS

        if not (path.parent / "med_config.json").is_file():
            raise SafeJaxError(f"config.reward.checkpoint {file}: no med_config.json beside it (BLIP's, from the "
                               "ImageReward release)")
        if not any((path.parent / folder).is_dir() for folder in TOKENIZER_FOLDERS):
            raise SafeJaxError(f"config.reward.checkpoint {file}: no BERT tokenizer folder beside it "
                               f"(bert-base-uncased's tokenizer files in {path.parent / TOKENIZER_FOLDERS[0]})")


def _check_mesh(c: Callable[[str], Any], devices: int | None) -> None:
    import jax

    n = jax.device_count() if devices is None else devices
    sizes = {axis: c(f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")}
    text = ", ".join(f"config.mesh.{k}={v}" for k, v in sizes.items())
    known = math.prod(v for v in sizes.values() if v != -1)
    if (-1 in sizes.values() and n % known) or (-1 not in sizes.values() and known != n):
        raise SafeJaxError(f"config.mesh does not fit the {n} device(s): {text} "
                           "(their product must equal the device count; one may be -1 for the rest)")
    for axis, v in sizes.items():
        if v == -1:
            sizes[axis] = n // known
    b, shards, processes = c("data.batch_size"), sizes["data"] * sizes["fsdp"], jax.process_count()
    if b % shards or b % processes:
        raise SafeJaxError(f"config.data.batch_size ({b}) must be a multiple of config.mesh.data × config.mesh.fsdp "
                           f"({shards}) and of the number of processes ({processes})")
