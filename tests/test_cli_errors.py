"""Every command-line mistake is one line on stderr and exit code 2, before any model is loaded.

(`train` and `export` have their own table in test_train_errors.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

GENERATE = ["-m", "launch.generate", "--prompt", "a flood in Leeds"]
CASES = [
    # (arguments, what the one line must name)
    (GENERATE + ["--batch-size", "0"], "argument --batch-size: must be ≥ 1, got 0"),
    (GENERATE + ["--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
    (GENERATE + ["--height", "-64"], "argument --height: must be a positive multiple of 8, got -64"),
    (GENERATE + ["--height", "0"], "argument --height: must be a positive multiple of 8, got 0"),
    (GENERATE + ["--width", "100"], "argument --width: must be a positive multiple of 8, got 100"),
    (GENERATE + ["--guidance", "nan"], "argument --guidance: must be a finite number, got nan"),
    (GENERATE + ["--guidance", "-1"], "argument --guidance: must lie in [0, inf], got -1"),
    (GENERATE + ["--steps", "0"], "argument --steps: must be ≥ 1, got 0"),
    (GENERATE + ["--seed", "-3"], "argument --seed: must be ≥ 0, got -3"),
    (GENERATE + ["--seed", str(2 ** 32 - 1), "--prompt", "b"], "argument --seed: seed + number of prompts - 1"),
    (GENERATE + ["--subject-weight", "0"], "argument --subject-weight: must lie in (0, inf], got 0"),
    (GENERATE + ["--subject-weight", "inf"], "argument --subject-weight: must be a finite number"),
    (GENERATE + ["--scheduler", "pndm"], "argument --scheduler: invalid choice: 'pndm'"),
    (GENERATE + ["--out", "{file}"], "argument --out: {file} exists and is not a directory"),
    (GENERATE + ["--out", "{file}/sub"], "argument --out: cannot create {file}/sub: {file} is not a directory"),
    (GENERATE + ["--out", "/proc/safe-jax-out"], "argument --out: cannot write to /proc/safe-jax-out"),
    (["-m", "launch.generate"], "the following arguments are required: --prompt"),
    (["-m", "launch.subjects", "--in", "x.jsonl"], "--in and --out are required"),
    (["-m", "launch.subjects", "--in", "x.jsonl", "--out", "{file}/y.jsonl"], "argument --out: {file} exists and is not a directory"),
    (["-m", "launch.subjects", "--demo", "--concurrency", "0"], "argument --concurrency: must be ≥ 1, got 0"),
    (["-m", "launch.subjects", "--demo", "--rate", "-1"], "argument --rate: must lie in [0, inf], got -1"),
    (["-m", "launch.subjects", "--demo", "--timeout", "0"], "argument --timeout: must lie in (0, inf], got 0"),
    (["-m", "launch.subjects", "--demo", "--max-subjects", "0"], "argument --max-subjects: must be ≥ 1, got 0"),
    (["-m", "launch.demo", "--steps", "0"], "argument --steps: must be ≥ 1, got 0"),
    (["-m", "launch.demo", "--prompts", "-1"], "argument --prompts: must be ≥ 1, got -1"),
    (["-m", "launch.demo", "--out", "{file}"], "argument --out: {file} exists and is not a directory"),
    (["-m", "launch.cli", "generate", "--height", "12", "--prompt", "x"], "argument --height: must be a positive multiple of 8"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[1:]) for a, _ in CASES])
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, args, message):
    file = tmp_path / "a-file.txt"
    file.write_text("not a directory")
    args = [a.replace("{file}", str(file)) for a in args]
    message = message.replace("{file}", str(file))
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("safe-jax ") and ": error: " in lines[0]
    assert not any(tmp_path.glob("out")), "nothing may be written for a bad command line"
