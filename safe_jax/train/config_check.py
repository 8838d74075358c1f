"""Checks of a training config (``launch/configs/base.py``'s fields), before anything is loaded or compiled.

    validate_config(config)   # SafeJaxError naming the field: "config.checkpoint.every must be ≥ 1, got 0"

``train()`` calls it first, so a bad value fails in a second, not after the model load and the
compile. Every field of the base config is checked (its type, its range or its choices); a field
the base config does not have is refused (a typo would otherwise be ignored), and so is one it has
that the config lacks.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from safe_jax.errors import SafeJaxError

# A check returns None when the value is good, else what is wrong ("must be ≥ 1, got 0").
Check = Callable[[Any], "str | None"]


def _integer(low: int | None = None, multiple: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            return f"must be an integer, got {v!r}"
        if low is not None and v < low:
            return f"must be ≥ {low}, got {v}"
        if multiple and v % multiple:
            return f"must be a multiple of {multiple}, got {v}"
        return None
    return check


def _number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
            optional: bool = False) -> Check:
    """A finite real number in the interval (NaN and ±Inf refused); None too where ``optional``."""
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return f"must be a number{' or None' if optional else ''}, got {v!r}"
        if not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if v < low or (low_open and v == low):
            return f"must be {'>' if low_open else '≥'} {low:g}, got {v:g}"
        if v > high or (high_open and v == high):
            return f"must be {'<' if high_open else '≤'} {high:g}, got {v:g}"
        return None
    return check


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        if v not in options:
            return f"must be one of {', '.join(repr(o) for o in options)}, got {v!r}"
        return None
    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _string(nonempty: bool = False, optional: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        if not isinstance(v, str):
            return f"must be a string{' or None' if optional else ''}, got {v!r}"
        if nonempty and not v:
            return "must not be empty"
        return None
    return check


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
        "model": _string(nonempty=True),
        "dtype": _choice("", "float32", "bfloat16", "float16"),
        "attention_impl": _choice("", "xla", "cudnn"),
        "remat_policy": _remat_policy,
        "workdir": _string(nonempty=True),
        "seed": _integer(low=0),
        "steps": _integer(low=1),
        "mode": _choice("lora", "full"),
        "lora_rank": _integer(low=1),
        "lora_alpha": _number(0, low_open=True, optional=True),
        "data.name": _string(nonempty=True),
        "data.data_dir": _string(nonempty=True, optional=True),
        "data.split": _string(nonempty=True),
        "data.resolution": _integer(low=8, multiple=8),
        "data.batch_size": _integer(low=1),
        "data.crop": _choice(*CROPS),
        "data.flip": _boolean,
        "data.worker_count": _integer(low=0),
        "data.read_threads": _integer(low=0),
        "subjects.weight": _number(0, low_open=True),
        "subjects.weighting": _choice(*METHODS),
        "subjects.format": _choice(*FORMATS),
        "subjects.max_downweighted": _integer(low=1),
        "mesh.data": _mesh_size,
        "mesh.fsdp": _mesh_size,
        "mesh.tensor": _mesh_size,
        "loss.kind": _choice("denoising", "refl", "both"),
        "loss.mix": _choice("alternate", "weighted"),
        "loss.refl_weight": _number(0),
        "loss.cond_dropout": _number(0, 1),
        "loss.min_snr_gamma": _number(0, low_open=True, optional=True),
        "loss.refl_steps": _integer(low=1),
        "loss.refl_step_min": _integer(low=0),
        "loss.refl_step_max": _integer(low=0),
        "loss.refl_lambda": _number(),
        "loss.refl_grad_scale": _number(0, low_open=True),
        "reward.name": _choice(*rewards.available_rewards()),
        "reward.clip": _string(nonempty=True),
        "reward.alpha": _number(),
        "reward.checkpoint": _string(),
        "reward.arch": _string(),
        "optim.lr": _number(0, low_open=True),
        "optim.schedule": _choice("cosine", "constant"),
        "optim.warmup_steps": _integer(low=0),
        "optim.weight_decay": _number(0),
        "optim.clip_norm": _number(0, optional=True),
        "optim.accumulate": _integer(low=1),
        "optim.ema_decay": _number(0, 1, high_open=True, optional=True),
        "nan_policy": _choice("skip", "halt"),
        "checkpoint.every": _integer(low=1),
        "checkpoint.keep": _integer(low=1),
        "checkpoint.best_metric": _string(),
        "checkpoint.best_mode": _choice("min", "max"),
        "checkpoint.async_save": _boolean,
        "log_every": _integer(low=1),
        "peak_tflops": _number(0, low_open=True, optional=True),
        "sample.every": _integer(low=0),
        "sample.prompts": _prompts,
        "sample.steps": _integer(low=1),
        "sample.guidance": _number(),
        "sample.scheduler": _choice(*SAMPLERS),
        "export.enabled": _boolean,
        "export.dir": _string(),
        "export.dtype": _choice("float32", "float16", "bfloat16"),
        "export.use_ema": _boolean,
    }


def validate_config(config: Any, *, devices: int | None = None, check_devices: bool = True) -> None:
    """Raise ``SafeJaxError`` naming the first bad field of ``config`` (a ConfigDict or nested mapping).

    With ``check_devices`` the mesh sizes are checked against ``devices`` (default: all of JAX's
    devices) and the batch size against the mesh and the number of processes; the launcher checks
    without them before JAX's distributed runtime is up.
    """
    fields = _flatten(config)
    spec = _spec()
    for path in fields:
        if path not in spec:
            near = difflib.get_close_matches(path, list(spec), n=1)
            hint = f" (did you mean config.{near[0]}?)" if near else ""
            raise SafeJaxError(f"config.{path} is not a config field{hint}")
    for path, check in spec.items():
        if path not in fields:
            raise SafeJaxError(f"config.{path} is missing (see launch/configs/base.py)")
        problem = check(fields[path])
        if problem:
            raise SafeJaxError(f"config.{path} {problem}")
    c = fields.get
    _cross_checks(c)
    if check_devices:
        _check_mesh(c, devices)
    _check_writable("config.workdir", c("workdir"))
    if c("export.enabled"):
        _check_writable("config.export.dir" if c("export.dir") else "config.workdir (its export folder)",
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


def _check_writable(field: str, path: str) -> None:
    """A directory that exists and takes a new file, or that can be created: probed with a real
    write (permission bits say nothing for root, nor for read-only or special filesystems)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SafeJaxError(f"{field}: {p} exists and is not a directory")
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise SafeJaxError(f"{field}: cannot create {p}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise SafeJaxError(f"{field}: cannot write to {p} (a test file in {probe} failed: {e.strerror})") from None


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: the leaves of a ConfigDict (placeholders resolved) or nested mapping."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(tree, Mapping):
        raise SafeJaxError(f"config{'.' + prefix.rstrip('.') if prefix else ''} must be a ConfigDict or a mapping, "
                           f"got {type(config).__name__}")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
