"""Turn user errors into one line on stderr and exit code 2, instead of a traceback.

Two doors: ``one_line_errors`` for ``SafeJaxError`` raised while a command runs, and
``ArgumentParser`` with the value checkers below for command-line values, checked as they are
parsed (before any model is loaded or anything is compiled).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import tempfile
from pathlib import Path

from safe_jax.errors import SafeJaxError


def one_line_errors(prog: str):
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SafeJaxError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (``prog: error: argument --x: ...``), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(low: int):
    """An integer ≥ ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value
    parse.__name__ = f"integer ≥ {low}"
    return parse


def float_in(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False):
    """A finite float in [low, high] (or (low, high] with ``low_open``); NaN and ±Inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (low_open and value == low) or value > high:
            lo = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must lie in {lo}{low:g}, {high:g}], got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def multiple_of(factor: int):
    """A positive integer multiple of ``factor`` (image sides: the VAE's downscale)."""
    def parse(text: str) -> int:
        value = int_at_least(-2 ** 63)(text)
        if value < 1 or value % factor:
            raise argparse.ArgumentTypeError(f"must be a positive multiple of {factor}, got {value}")
        return value
    parse.__name__ = f"multiple of {factor}"
    return parse


def output_dir(text: str) -> Path:
    """A directory we may create or write into: not an existing file, and its nearest existing
    ancestor a writable directory."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {probe} is not a directory")
    try:  # a real write: permission bits say nothing for root, nor for read-only or special filesystems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write to {path}: {probe} is not writable ({e.strerror})") from None
    return path


def output_file(text: str) -> Path:
    """A file we may (over)write: not a directory, in a directory we can create or write."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory")
    output_dir(str(path.parent))
    return path
