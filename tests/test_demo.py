"""The README's main command, shortened: `safe-jax demo` runs every stage and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """Every stage on the shipped tiny-anchor: 2 training steps, 2 held-out captions × 2 seeds, 3 sampler steps."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "launch.demo", "--out", str(tmp_path), "--steps", "2", "--limit", "2",
                          "--seeds", "0,1", "--sample-steps", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = ["base-plain", "base-weighted", "safe-plain", "safe-weighted"]
    assert list(summary["results"]) == rows
    for row in rows:
        for key in ("clipscore", "subject_recall@1", "world_recall", "fid_clip"):
            assert key in summary["results"][row], (row, key)
    # the verdict compares three rows with base-plain on four metrics, each with its spread
    assert {(v["row"], v["metric"]) for v in summary["verdict"]} == {
        (r, m) for r in rows[1:] for m in ("clipscore", "subject_recall@1", "world_recall", "fid_clip")}
    transfer = summary["reward_transfer"]  # the reward CLIP's view of the same held-out images
    assert np.isfinite(transfer["train_reward_first"]) and set(transfer["reward_clipscore"]) == set(rows)
    sanity = summary["sanity"]
    assert sanity["fid_judge_noise"] > sanity["fid_judge_generated"] > 0
    assert sanity["world_recall_real"] > 0.5
    report = (tmp_path / "report.md").read_text()
    for name in ("loss.png", "reward.png", *(f"eval/grids/{r}.png" for r in rows)):
        assert f"({name})" in report, name
        Image.open(tmp_path / name).verify()
    assert "vs base-plain" in report
    export = tmp_path / "run" / "export"
    assert (export / "model_index.json").is_file() and (export / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert len(list((tmp_path / "eval" / "images" / "safe-weighted").glob("*.png"))) == 4
