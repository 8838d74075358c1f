"""Report pieces: crash-tolerant metrics reading, curve plots, labelled sample grids, Markdown."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from launch import report
from safe_jax import SafeJaxError


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5, "lr": null}\n{"step": 2, "lo')
    records = report.read_metrics(path)
    assert [r["step"] for r in records] == [0, 1]
    assert math.isnan(records[1]["lr"])


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", ['{"step": 0}', '{"step": 1, "lo', '{"step": 2}'])
    with pytest.raises(SafeJaxError, match=r"m\.jsonl:2"):
        report.read_metrics(path)
    path = _write_lines(tmp_path / "nostep.jsonl", ['{"loss": 1.0}', '{"step": 2}'])
    with pytest.raises(SafeJaxError, match="step"):
        report.read_metrics(path)
    with pytest.raises(SafeJaxError, match="cannot read"):
        report.read_metrics(tmp_path / "missing.jsonl")


def test_read_metrics_resumed_run_keeps_last_occurrence_sorted(tmp_path):
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (0, 1, 2, 3)]
    # Resumed from the step-1 checkpoint: steps 2 and 3 logged again with new values, then 4.
    lines += [json.dumps({"step": s, "loss": 10.0 + s, "reward": 0.1}) for s in (2, 3, 4)]
    lines.insert(1, "")  # blank lines are ignored
    records = report.read_metrics(_write_lines(tmp_path / "m.jsonl", lines))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in records] == [0.0, 1.0, 12.0, 13.0, 14.0]
    assert "reward" not in records[1] and records[2]["reward"] == 0.1


def _records(n=40):
    rng = np.random.default_rng(0)
    out = [{"step": s, "loss": float(1 / (s + 1) + 0.05 * rng.random())} for s in range(n)]
    for r in out[::3]:
        r["reward"] = float(rng.random())
    out[5]["loss"] = float("nan")
    out[6]["reward"] = float("nan")
    return out


def test_plot_curves_writes_png_and_handles_nan(tmp_path):
    out = report.plot_curves(_records(), ["loss", "reward", "grad_norm"], tmp_path / "sub" / "curves.png",
                             title="run", smooth=5)
    assert out == tmp_path / "sub" / "curves.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGBA"
        # Two subplots (grad_norm is absent everywhere and left out), stacked.
        assert img.height > img.width * 0.5


def test_plot_curves_all_nan_and_bad_input(tmp_path):
    records = [{"step": s, "loss": float("nan")} for s in range(3)]
    assert report.plot_curves(records, ["loss"], tmp_path / "nan.png").exists()
    with pytest.raises(SafeJaxError, match="none of the metrics"):
        report.plot_curves(_records(), ["refl_loss", "lr"], tmp_path / "none.png")
    with pytest.raises(SafeJaxError, match="smooth"):
        report.plot_curves(_records(), ["loss"], tmp_path / "x.png", smooth=-1)


def _images(r, c, h=32, w=32):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (r, c, h, w, 3), dtype=np.uint8)


def test_image_grid_layout_2x3(tmp_path):
    arr = _images(2, 3)
    labels = (["subject a", "subject b"], ["step 0", "step 500", "step 1000"])
    out = report.image_grid([list(row) for row in arr], *labels, tmp_path / "grid.png")
    with Image.open(out) as img:
        grid = np.asarray(img.convert("RGB"))
    cell = 128  # 32 px samples upscaled 4x
    left, top = grid.shape[1] - 3 * cell, grid.shape[0] - 2 * cell
    assert left > 0 and top > 0
    # Every sample sits, nearest-neighbour upscaled, in its cell.
    for i in range(2):
        for j in range(3):
            tile = grid[top + i * cell: top + (i + 1) * cell, left + j * cell: left + (j + 1) * cell]
            np.testing.assert_array_equal(tile, arr[i, j].repeat(4, 0).repeat(4, 1))
    # The header and label column hold text (some non-white pixels).
    assert (grid[:top, left:] < 128).any() and (grid[top:, :left] < 128).any()
    # An explicit cell size, from an array input; the label column keeps its width.
    out = report.image_grid(arr, *labels, tmp_path / "grid64.png", cell=64)
    with Image.open(out) as img:
        assert img.size == (left + 3 * 64, top + 2 * 64)


def test_image_grid_rejects_bad_shapes_and_labels(tmp_path):
    arr = _images(2, 3)
    rows = [list(row) for row in arr]
    out = tmp_path / "g.png"
    with pytest.raises(SafeJaxError, match="row labels"):
        report.image_grid(rows, ["a"], ["x", "y", "z"], out)
    with pytest.raises(SafeJaxError, match="column labels"):
        report.image_grid(rows, ["a", "b"], ["x", "y"], out)
    bad = [rows[0], rows[1][:2] + [np.zeros((16, 32, 3), np.uint8)]]
    with pytest.raises(SafeJaxError, match=r"image \[1\]\[2\]"):
        report.image_grid(bad, ["a", "b"], ["x", "y", "z"], out)
    with pytest.raises(SafeJaxError, match="row 1 has 2"):
        report.image_grid([rows[0], rows[1][:2]], ["a", "b"], ["x", "y", "z"], out)
    with pytest.raises(SafeJaxError, match="uint8"):
        report.image_grid([[arr[0, 0].astype(np.float32)]], ["a"], ["x"], out)
    assert not out.exists()


def test_summary_table_and_write_report(tmp_path):
    table = report.summary_table(
        [{"run": "base", "loss": 0.123456, "reward": float("nan"), "step": 1000},
         {"run": "safe|lora", "loss": 12345.678}], ["run", "step", "loss", "reward"])
    assert table.splitlines() == [
        "| run | step | loss | reward |",
        "|---|---|---|---|",
        "| base | 1000 | 0.1235 | nan |",
        "| safe\\|lora |  | 1.235e+04 |  |",
    ]
    with pytest.raises(SafeJaxError):
        report.summary_table([], [])

    png = report.image_grid(_images(1, 1), ["a"], ["x"], tmp_path / "out" / "img" / "grid.png")
    link = report.image_link(png, tmp_path / "out", alt="samples")
    assert link == "![samples](img/grid.png)"
    path = report.write_report(tmp_path / "out", "SAFE run", [("Metrics", table), ("Samples", link)])
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    assert text.startswith("# SAFE run\n")
    assert "## Metrics\n\n| run | step |" in text and "## Samples\n\n![samples](img/grid.png)\n" in text
    assert text.index("## Metrics") < text.index("## Samples")
    with pytest.raises(SafeJaxError, match="section 0"):
        report.write_report(tmp_path / "out", "x", [("only a heading",)])
