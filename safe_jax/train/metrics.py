"""Training metrics: TensorBoard event files, a JSONL log, and model FLOPs utilisation.

Only process 0 writes. Every step's scalars go to ``metrics.jsonl`` (appended line by line and
flushed, so a crash loses at most the line being written). A resumed run first drops the lines
after the step it restored (``resume_step``; a torn last line goes too), so the file keeps one line
per step however often the run was killed or fell back to an older checkpoint; TensorBoard is
told to hide its events after that step as well. TensorBoard gets the same scalars plus sample
image grids, through tensorboardX (no TensorFlow needed).

``logdir`` may be remote (``gs://…``, see ``safe_jax.io.storage``): an object cannot be appended
to, so there the JSONL is rewritten whole at most every 30 s and on ``flush``/``close`` (a crash
loses the lines since), and the event file is rewritten on each TensorBoard flush.

MFU is the step's FLOPs as XLA counts them in the compiled program, over the step time and the
device's peak dense bf16 FLOP/s; a device not in ``PEAK_FLOPS`` (a CPU) gets no MFU unless a
peak is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from safe_jax.io import atomic, storage

# Peak dense bf16 FLOP/s per device, by a substring of ``device.device_kind`` (first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def device_peak_flops(device: Any = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first), or None when unknown."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_FLOPS if name.lower() in kind.lower()), None)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled executable, per device, from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def finite_means(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Per key, the mean of the finite numbers in ``rows`` (keys with none are left out): ReFL
    metrics are NaN/None on denoising steps and must not pull a mean."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(key, []).append(float(value))
    return {key: float(np.mean(v)) for key, v in sorted(values.items())}


def mfu(flops_per_device: float | None, step_time: float, peak: float | None) -> float | None:
    if not flops_per_device or not peak or step_time <= 0:
        return None
    return flops_per_device / (step_time * peak)


class MetricWriter:
    """Scalars and images to TensorBoard and ``metrics.jsonl`` under ``logdir`` (process 0 only).

    ``resume_step``: the step the run (re)starts from; lines and TensorBoard events after it, from
    an earlier attempt, are dropped so that the steps to come are not logged twice.
    """

    def __init__(self, logdir: str | Path, enabled: bool | None = None, resume_step: int | None = None):
        self.logdir = storage.as_path(logdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            path = self.logdir / "metrics.jsonl"
            if resume_step is not None:
                truncate_jsonl(path, resume_step)
            purge = {} if resume_step is None else {"purge_step": int(resume_step) + 1}
            self._tb = SummaryWriter(storage.tensorboard_logdir(self.logdir / "tensorboard"), **purge)
            old = path.read_bytes() if path.is_file() else b""
            torn = old and not old.endswith(b"\n")
            self._jsonl = storage.open_append(path)
            if torn:  # a crash cut the last line: the resumed run starts on a line of its own
                self._jsonl.write("\n")

    def scalars(self, step: int, values: Mapping[str, Any], tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: _number(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}, allow_nan=False) + "\n")
        self._jsonl.flush()
        if tensorboard:
            for key, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(f"train/{key}", value, int(step))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """One uint8 [H, W, 3] image (e.g. a sample grid)."""
        if self.enabled:
            self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, 0)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()
            if isinstance(self._jsonl, storage.RemoteAppender):
                self._jsonl.sync()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the lines of the metrics file ``path`` with ``step`` ≤ ``last_step`` (and lines without
    a step); drop the others and any line that is not JSON (a torn last line). The file is replaced
    atomically. Returns the number of lines dropped."""
    path = storage.as_path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row.get("step") if isinstance(row, dict) else None
        except ValueError:
            dropped += 1
            continue
        if isinstance(step, (int, float)) and step > last_step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped and storage.is_remote(path):  # an object is replaced whole anyway
        path.write_text("".join(kept), encoding="utf-8")
    elif dropped:
        atomic.write_text(path, "".join(kept))
    return dropped


def _number(value: Any) -> float | None:
    """A JSON-safe float: NaN and Inf become None (JSON has no NaN); bools become 0/1."""
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None
