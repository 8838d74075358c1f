"""Checkers for the fields of model ``config.json`` files (diffusers and transformers).

Each takes ``source`` (the file, e.g. ``unet/config.json``, or a label like "UNet config"), the
field's name and its raw JSON value, and returns the value or raises one clear SafeJaxError line
naming both, so a hand-edited config is refused on load, not deep inside a forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from safe_jax.errors import SafeJaxError


def show(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr (one line, since repr escapes newlines), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # JSON NaN / Infinity are not settings
    return is_int(value)


def config_object(source: str, config: Any) -> Mapping[str, Any]:
    if not isinstance(config, Mapping):
        raise SafeJaxError(f"{source}: must be a JSON object, got {type(config).__name__}")
    return config


def config_int(source: str, key: str, value: Any, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SafeJaxError(f"{source}: {key} must be {want}, got {show(value)}")
    return value


def config_optional_int(source: str, key: str, value: Any, minimum: int = 1) -> int | None:
    return None if value is None else config_int(source, key, value, minimum)


def config_ints(source: str, key: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty JSON list of integers >= minimum."""
    if (not isinstance(value, (list, tuple)) or not value
            or not all(is_int(v) and v >= minimum for v in value)):
        want = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise SafeJaxError(f"{source}: {key} must be a list of {want}, got {show(value)}")
    return tuple(value)


def config_int_or_ints(source: str, key: str, value: Any, minimum: int = 1) -> int | tuple[int, ...]:
    """One integer, or a non-empty list of them (diffusers' per-block settings)."""
    if isinstance(value, (list, tuple)) and value and all(is_int(v) and v >= minimum for v in value):
        return tuple(value)
    if is_int(value) and value >= minimum:
        return value
    want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise SafeJaxError(f"{source}: {key} must be {want} or a list of them, got {show(value)}")


def config_number(source: str, key: str, value: Any, *, positive: bool = False, minimum: float | None = None) -> float:
    ok = is_number(value) and (not positive or value > 0) and (minimum is None or value >= minimum)
    if not ok:
        want = "a positive number" if positive else f"a number >= {minimum}" if minimum is not None else "a number"
        raise SafeJaxError(f"{source}: {key} must be {want}, got {show(value)}")
    return value


def config_bool(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SafeJaxError(f"{source}: {key} must be true or false, got {show(value)}")
    return value


def config_names(source: str, key: str, value: Any) -> tuple[str, ...]:
    """A non-empty JSON list of strings (block type names)."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise SafeJaxError(f"{source}: {key} must be a list of block type names, got {show(value)}")
    return tuple(value)


def config_groups_divide(source: str, groups: int, channels: tuple[int, ...], what: str = "block_out_channels") -> None:
    """GroupNorm needs ``norm_num_groups`` to divide every channel count it normalises."""
    for c in channels:
        if c % groups:
            raise SafeJaxError(f"{source}: norm_num_groups={groups} does not divide {what} {c}")


def check_unsupported(source: str, what: str, config: Mapping[str, Any], required: Mapping[str, Any]) -> None:
    """Settings diffusers supports and we do not: each must be absent or hold the value we
    implement (a per-block list of booleans counts as true if any is), else one line naming it."""
    for key, want in required.items():
        got = config.get(key, want)
        if isinstance(want, bool) and isinstance(got, (list, tuple)):
            got = any(got)
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            raise SafeJaxError(f"{source}: unsupported {what} architecture: {key}={show(got)} "
                               f"(safe-jax supports {want!r})")


def diffusers_blocks(source: str, what: str, config: Any, required: Mapping[str, Any],
                     default_channels: tuple[int, ...]) -> tuple[Mapping[str, Any], dict[str, Any], int]:
    """The common start of a diffusers model config: (the config, the fields read so far with
    ``block_out_channels`` checked, the number of blocks) after refusing unsupported settings."""
    config = config_object(source, config)
    check_unsupported(source, what, config, required)
    kw: dict[str, Any] = {}
    if "block_out_channels" in config:
        kw["block_out_channels"] = config_ints(source, "block_out_channels", config["block_out_channels"])
    return config, kw, len(kw.get("block_out_channels", default_channels))
