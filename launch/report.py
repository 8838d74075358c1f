"""The pieces of a short Markdown training report: metrics, loss curves, sample grids, tables.

A run leaves a metrics JSONL file and sample images behind; a report turns them into something a
person can read in a minute. The input is whatever a real run leaves, crashes included: the last
line may be cut off mid-write, and a resumed run logs some steps again. Every function here works
without JAX, and plotting uses matplotlib's Agg canvas, so nothing ever opens a window.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from safe_jax.errors import SafeJaxError

MIN_CELL = 128  # image_grid upscales smaller samples to at least this many pixels a side
_PAD = 6


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics JSONL file, one per step, sorted by step.

    A last line that does not parse (a crash mid-write) is skipped; a bad line anywhere else is an
    error. When a step appears more than once (a resumed run), the last occurrence wins. JSON
    ``null`` values become NaN.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SafeJaxError(f"cannot read metrics file {path}: {e}") from e
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    by_step: dict[int, dict] = {}
    for k, (lineno, line) in enumerate(numbered):
        last = k == len(numbered) - 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if last:
                break  # truncated by a crash mid-write
            raise SafeJaxError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            if last:
                break
            raise SafeJaxError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if not isinstance(step, int) or isinstance(step, bool):
            raise SafeJaxError(f"{path}:{lineno}: record has no integer 'step' (got {step!r})")
        record = {key: (math.nan if value is None else value) for key, value in record.items()}
        record["step"] = step
        by_step[step] = record  # later lines overwrite earlier ones
    return [by_step[s] for s in sorted(by_step)]


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and finite values of ``key``, skipping records without it and NaN/inf/non-numbers."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def _moving_average(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing moving average over the last ``window`` points, placed at each window's last step."""
    c = np.cumsum(np.concatenate([[0.0], y]))
    return x[window - 1:], (c[window:] - c[:-window]) / window


def plot_curves(records: Sequence[dict], keys: Iterable[str], out_png: str | os.PathLike,
                title: str | None = None, smooth: int = 0) -> Path:
    """One PNG with a subplot per metric in ``keys`` that the records contain, against step.

    Raw values are drawn thin; with ``smooth > 1`` a trailing moving average of that many points is
    drawn over them. NaN and missing values are skipped. Keys absent from every record are left
    out; it is an error if that leaves none.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [keys] if isinstance(keys, str) else list(keys)
    if not isinstance(smooth, int) or isinstance(smooth, bool) or smooth < 0:
        raise SafeJaxError(f"smooth must be a non-negative integer window, got {smooth!r}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "step" not in r:
            raise SafeJaxError(f"record {i} is not a dict with a 'step' (use read_metrics)")
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        raise SafeJaxError(f"none of the metrics {keys} appear in the {len(records)} records")

    fig = Figure(figsize=(7.0, 2.2 * len(present) + (0.4 if title else 0.0)))
    FigureCanvasAgg(fig)  # Agg explicitly: renders to a buffer, never a window
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, present):
        x, y = _series(records, key)
        ax.plot(x, y, linewidth=0.7, alpha=0.45 if smooth > 1 else 1.0, label="raw")
        if smooth > 1 and len(y) >= smooth:
            ax.plot(*_moving_average(x, y, smooth), linewidth=1.6, label=f"mean of {smooth}")
            ax.legend(loc="best", fontsize="small")
        if len(y) == 0:
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, format="png")
    return out_png


def _wrap(text: str, font: Any, width: float) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels; a word longer than that gets its own line."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _as_rows(rows: Any) -> list[list[np.ndarray]]:
    """``rows`` as a list of lists of HxWx3 uint8 arrays, all of one size; errors name the bad cell."""
    if isinstance(rows, np.ndarray):
        if rows.ndim != 5 or rows.shape[-1] != 3:
            raise SafeJaxError(f"image array must be [R, C, H, W, 3], got shape {rows.shape}")
        rows = [list(r) for r in rows]
    rows = [list(r) for r in rows]
    if not rows or not rows[0]:
        raise SafeJaxError("image_grid needs at least one row with at least one image")
    ncol = len(rows[0])
    shape = None
    for i, row in enumerate(rows):
        if len(row) != ncol:
            raise SafeJaxError(f"row {i} has {len(row)} images, row 0 has {ncol}")
        for j, img in enumerate(row):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                raise SafeJaxError(f"image [{i}][{j}] must be uint8 HxWx3, got {img.dtype} {img.shape}")
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise SafeJaxError(f"image [{i}][{j}] is {img.shape}, image [0][0] is {shape}")
            row[j] = img
    return rows


def image_grid(rows: Any, row_labels: Sequence[str], col_labels: Sequence[str],
               out_png: str | os.PathLike, cell: int | None = None) -> Path:
    """Save a labelled grid of samples: a label column on the left, a header row on top.

    ``rows`` is a list of lists (or an [R, C, H, W, 3] array) of uint8 HxWx3 images, all the same
    size. ``cell`` is each cell's height in pixels (width keeps the aspect ratio); by default small
    images are upscaled by a whole factor, nearest-neighbour, to at least 128 px a side.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = _as_rows(rows)
    nrow, ncol = len(rows), len(rows[0])
    row_labels, col_labels = [str(s) for s in row_labels], [str(s) for s in col_labels]
    if len(row_labels) != nrow:
        raise SafeJaxError(f"{len(row_labels)} row labels for {nrow} rows")
    if len(col_labels) != ncol:
        raise SafeJaxError(f"{len(col_labels)} column labels for {ncol} columns")
    h, w = rows[0][0].shape[:2]
    if cell is None:
        factor = max(1, math.ceil(MIN_CELL / min(h, w)))
        ch, cw = h * factor, w * factor
    else:
        if not isinstance(cell, int) or isinstance(cell, bool) or cell < 1:
            raise SafeJaxError(f"cell must be a positive number of pixels, got {cell!r}")
        ch, cw = cell, max(1, round(w * cell / h))
    resample = Image.Resampling.NEAREST if ch >= h else Image.Resampling.LANCZOS

    font = ImageFont.load_default()
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + 2
    label_w = min(max(cw, 160), max(font.getlength(s) for s in row_labels + [""]))
    row_lines = [_wrap(s, font, label_w) for s in row_labels]
    col_lines = [_wrap(s, font, cw - 2 * _PAD) for s in col_labels]
    left = int(math.ceil(max(max(font.getlength(t) for t in ls) for ls in row_lines))) + 2 * _PAD
    top = max(len(ls) for ls in col_lines) * line_h + 2 * _PAD

    canvas = Image.new("RGB", (left + ncol * cw, top + nrow * ch), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(col_lines):
        for k, text in enumerate(lines):
            x = left + j * cw + (cw - font.getlength(text)) / 2
            draw.text((x, _PAD + k * line_h), text, fill="black", font=font)
    for i, (row, lines) in enumerate(zip(rows, row_lines)):
        y0 = top + i * ch + (ch - len(lines) * line_h) / 2
        for k, text in enumerate(lines):
            draw.text((_PAD, y0 + k * line_h), text, fill="black", font=font)
        for j, img in enumerate(row):
            tile = Image.fromarray(img, "RGB")
            if (cw, ch) != (w, h):
                tile = tile.resize((cw, ch), resample)
            canvas.paste(tile, (left + j * cw, top + i * ch))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return out_png


def _cell(value: Any) -> str:
    """One Markdown table cell: floats to 4 significant digits, missing values empty, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return f"{float(value):.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table with one line per row dict and the given columns; missing keys are empty."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise SafeJaxError("summary_table needs at least one column")
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SafeJaxError(f"summary_table row {i} is a {type(row).__name__}, not a dict")
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def image_link(image: str | os.PathLike, out_dir: str | os.PathLike, alt: str = "") -> str:
    """Markdown for an image, with its path relative to the report's folder ``out_dir``."""
    rel = os.path.relpath(Path(image).resolve(), Path(out_dir).resolve())
    return f"![{alt}]({Path(rel).as_posix()})"


def write_report(out_dir: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write ``out_dir/report.md``: a title, then a ``##`` heading and Markdown body per section.

    Bodies are written as given; reference images relative to ``out_dir`` (see ``image_link``).
    """
    parts = [f"# {title}".rstrip(), ""]
    for i, section in enumerate(sections):
        if not (isinstance(section, (tuple, list)) and len(section) == 2):
            raise SafeJaxError(f"section {i} must be a (heading, body) pair, got {section!r:.80}")
        heading, body = section
        if not isinstance(heading, str) or not isinstance(body, str):
            raise SafeJaxError(f"section {i}: heading and body must be strings")
        parts += [f"## {heading}".rstrip(), "", body.strip("\n"), ""]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
