"""The console commands, run the way users run them."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def test_generate_writes_pngs_with_settings(tmp_path):
    res = _run("-m", "launch.generate", "--model", "tiny", "--prompt", "Flooded street in Leeds",
               "--prompt", "A minister at a podium", "--steps", "3", "--seed", "4", "--scheduler", "euler_a",
               "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["0000-flooded-street-in-leeds.png", "0001-a-minister-at-a-podium.png"]
    image = Image.open(files[1])
    assert image.size == (64, 64) and image.mode == "RGB"
    settings = json.loads(image.text["parameters"])
    assert settings["prompt"] == "A minister at a podium"
    # Image i of a run gets seed + i: its own seed, replayable alone (tests/test_generate_seeds.py).
    assert (settings["steps"], settings["seed"], settings["scheduler"], settings["index"]) == (3, 5, "euler_a", 1)
    assert "generating" in res.stderr  # the progress bar


def test_export_command_writes_a_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    res = _run("-m", "launch.cli", "export", "--model", "tiny", "--out", str(tmp_path / "tiny"), "--dtype", "float16")
    assert res.returncode == 0, res.stderr[-2000:]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny")
    assert next(pipe.unet.parameters()).dtype.is_floating_point
    assert json.loads((tmp_path / "tiny" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_help_lists_commands():
    res = _run("-m", "launch.cli", "--help")
    assert res.returncode == 0 and "generate" in res.stdout and "export" in res.stdout
    res = _run("-m", "launch.cli", "nonsense")
    assert res.returncode == 2 and "unknown command 'nonsense'" in res.stderr
