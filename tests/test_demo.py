"""The README's main command, shortened: `safe-jax demo` runs every stage and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "launch.demo", "--out", str(tmp_path), "--steps", "2", "--prompts", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["rewards"]) == 4
    report = (tmp_path / "report.md").read_text()
    for name in ("loss.png", "reward.png", "grids.png"):
        assert f"({name})" in report
        Image.open(tmp_path / name).verify()
    export = tmp_path / "run" / "export"
    assert (export / "model_index.json").is_file() and (export / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert len(Image.open(tmp_path / "grids.png").size) == 2
