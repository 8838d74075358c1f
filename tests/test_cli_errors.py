"""Every command-line mistake is one line on stderr and exit code 2, before any model is loaded.

(`train` and `export` have their own table in test_train_errors.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

GENERATE = ["-m", "launch.generate", "--prompt", "a flood in Leeds"]
GENERATE_VALUES = [  # (flag, value, what the line says after "argument FLAG: ")
    ("--batch-size", "0", "must be ≥ 1, got 0"),
    ("--batch-size", "two", "expected an integer, got 'two'"),
    ("--height", "-64", "must be a positive multiple of 8, got -64"),
    ("--height", "0", "must be a positive multiple of 8, got 0"),
    ("--width", "100", "must be a positive multiple of 8, got 100"),
    ("--guidance", "nan", "must be a finite number, got nan"),
    ("--guidance", "-1", "must lie in [0, inf], got -1"),
    ("--steps", "0", "must be ≥ 1, got 0"),
    ("--seed", "-3", "must be ≥ 0, got -3"),
    ("--subject-weight", "0", "must lie in (0, inf], got 0"),
    ("--subject-weight", "inf", "must be a finite number"),
    ("--scheduler", "pndm", "invalid choice: 'pndm'"),
    ("--out", "{file}", "{file} exists and is not a directory"),
    ("--out", "{file}/sub", "cannot create {file}/sub: {file} is not a directory"),
    ("--out", "/proc/safe-jax-out", "cannot write to /proc/safe-jax-out"),
]
CASES = [(GENERATE + [flag, value], f"argument {flag}: {says}") for flag, value, says in GENERATE_VALUES] + [
    # (arguments, what the one line must name)
    (GENERATE + ["--seed", str(2 ** 32 - 1), "--prompt", "b"], "argument --seed: seed + number of prompts - 1"),
    (["-m", "launch.generate"], "the following arguments are required: --prompt"),
    (["-m", "launch.subjects", "--in", "x.jsonl"], "--in and --out are required"),
    (["-m", "launch.subjects", "--in", "x.jsonl", "--out", "{file}/y.jsonl"], "argument --out: {file} exists and is not a directory"),
    (["-m", "launch.subjects", "--demo", "--concurrency", "0"], "argument --concurrency: must be ≥ 1, got 0"),
    (["-m", "launch.subjects", "--demo", "--rate", "-1"], "argument --rate: must lie in [0, inf], got -1"),
    (["-m", "launch.subjects", "--demo", "--timeout", "0"], "argument --timeout: must lie in (0, inf], got 0"),
    (["-m", "launch.subjects", "--demo", "--max-subjects", "0"], "argument --max-subjects: must be ≥ 1, got 0"),
    (["-m", "launch.demo", "--steps", "0"], "argument --steps: must be ≥ 1, got 0"),
    (["-m", "launch.demo", "--limit", "1"], "argument --limit: must be ≥ 2, got 1"),
    (["-m", "launch.demo", "--seeds", "3"], "argument --seeds: expected at least two distinct non-negative integers, got '3'"),
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
