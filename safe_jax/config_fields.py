"""Checking a config field by field, before anything is loaded or compiled: the vocabulary shared
by training (``safe_jax/train/config_check.py``) and pre-training (``safe_jax/pretrain/config_check.py``)
configs, so both say the same thing in the same words.

A config is flattened to dotted paths (``"optim.lr"``) and each path has a ``Check``: a function
that returns None for a good value, else what is wrong (``"must be ≥ 1, got 0"``), which
``check_fields`` turns into one line naming the field. Every field is checked, a field the spec
does not know is refused (a typo would otherwise be ignored silently), and so is a missing one.
"""

from __future__ import annotations

import difflib
import math
import numbers
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from safe_jax.errors import SafeJaxError
from safe_jax.io import storage

Check = Callable[[Any], "str | None"]


def integer(low: int | None = None, *, below: int | None = None, multiple: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            return f"must be an integer, got {v!r}"
        if low is not None and v < low:
            return f"must be ≥ {low}, got {v}"
        if below is not None and v >= below:
            return f"must be < {below}, got {v}"
        if multiple and v % multiple:
            return f"must be a multiple of {multiple}, got {v}"
        return None
    return check


def integers(low: int = 1) -> Check:
    """A non-empty list of integers ≥ ``low`` (block widths, head counts)."""
    def check(v: Any) -> str | None:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not v or any(
                isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low for x in v):
            return f"must be a non-empty list of integers ≥ {low}, got {v!r}"
        return None
    return check


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
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


def choice(*options: str) -> Check:
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}, got {v!r}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def string(nonempty: bool = False, optional: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        if not isinstance(v, str):
            return f"must be a string{' or None' if optional else ''}, got {v!r}"
        if nonempty and not v:
            return "must not be empty"
        return None
    return check


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: the leaves of a ConfigDict (placeholders resolved) or nested mapping."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(tree, Mapping):
        raise SafeJaxError(f"config{'.' + prefix.rstrip('.') if prefix else ''} must be a ConfigDict or a mapping, "
                           f"got {type(config).__name__}")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_fields(fields: Mapping[str, Any], spec: Mapping[str, Check], *, unknown: str = "a config field",
                 defaults: str = "launch/configs/base.py") -> None:
    """Raise ``SafeJaxError`` at the first field of ``fields`` that ``spec`` does not know, lacks,
    or refuses. ``unknown`` completes "config.x is not …", ``defaults`` names the config to copy a
    missing field from."""
    for path in fields:
        if path not in spec:
            near = difflib.get_close_matches(path, list(spec), n=1)
            raise SafeJaxError(f"config.{path} is not {unknown}" + (f" (did you mean config.{near[0]}?)" if near else ""))
    for path, check in spec.items():
        if path not in fields:
            raise SafeJaxError(f"config.{path} is missing (see {defaults})")
        problem = check(fields[path])
        if problem:
            raise SafeJaxError(f"config.{path} {problem}")


def check_writable(field: str, path: str) -> None:
    """A directory that exists and takes a new file, or that can be created: probed with a real
    write (permission bits say nothing for root, nor for read-only or special filesystems).

    A URL (``gs://bucket/run``) is checked for a filesystem that can open it (``s3://`` needs
    s3fs, for instance), not written to: a bucket's permissions are checked by the first write,
    and a probe object per launch would outlive a crash.
    """
    if storage.is_remote(path):
        try:
            storage.as_path(path).exists()
        except ImportError as e:
            raise SafeJaxError(f"{field}: {path} needs a filesystem package that is not installed ({e})") from None
        except KeyError:  # epath's backend registry: no backend for the scheme
            scheme = path.split("://", 1)[0]
            raise SafeJaxError(f"{field}: no filesystem opens {path} ({scheme}:// is not a scheme etils.epath "
                               "knows; gs:// and s3:// are, and what fsspec resolves)") from None
        except Exception as e:  # noqa: BLE001
            # what a filesystem raises is its own: auth, network, a bad URL
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise SafeJaxError(f"{field}: cannot reach {path} ({type(e).__name__}: {first})") from None
        return
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
