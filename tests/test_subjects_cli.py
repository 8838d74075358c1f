"""``safe-jax subjects``: JSONL in and out, clear input errors, cache re-runs, crash safety."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_openai import LoopbackOpenAI, Reply

from launch.subjects import main

ROOT = Path(__file__).resolve().parents[1]
BORIS = ("London's mayor Boris Johnson gives a big thumbs up to photographers during the unveiling of the "
         "2012 Olympic rings on Tower Bridge.")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_offline_roundtrip_writes_every_line_atomically(tmp_path, no_key, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "x1", "caption": BORIS}, "",
                                              {"id": 7, "caption": "Firefighters at a flooded street in Leeds."}])
    out = tmp_path / "sub" / "out.jsonl"
    assert main(["--in", str(inp), "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert rows == [{"id": "x1", "subjects": ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"]},
                    {"id": 7, "subjects": ["Leeds", "Firefighters", "flooded street"]}]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temporary left behind
    assert "offline" in capsys.readouterr().err


@pytest.mark.parametrize("lines,message", [
    (['{"id": 1, "caption": "ok"}', '{"id": 2, "caption": "unterminated'], "line 2: not valid JSON"),
    (['{"id": 1}'], "line 1: missing field 'caption'"),
    (['{"caption": "no id"}'], "line 1: missing field 'id'"),
    (['["a", "list"]'], "line 1: expected a JSON object"),
    (['{"id": 1, "caption": 5}'], "line 1: 'caption' must be a string"),
    (['{"id": 1, "caption": "a"}', '', '{"id": 1, "caption": "b"}'], "line 3: duplicate id 1 (first on line 1)"),
])
def test_bad_input_lines_are_named(tmp_path, no_key, capsys, lines, message):
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    assert main(["--in", str(inp), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safe-jax subjects: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_openai_backend_rerun_makes_zero_requests_and_reports_failures(tmp_path, monkeypatch, capsys):
    rows = [{"id": i, "caption": f"Crowds gather in city number {i}."} for i in range(6)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--in", str(inp), "--out", str(tmp_path / "out.jsonl"), "--quiet", "--rate", "0"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-test-key-123")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default cache location
    bad = rows[4]["caption"]
    with LoopbackOpenAI(plan=lambda n, c: Reply(content="{") if c == bad else None) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert main(args) == 1  # one caption failed
        first = srv.chat_count()
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["subjects"] for r in out] == [["Crowds"]] * 4 + [[]] + [["Crowds"]]
    assert "malformed" in out[4]["error"] and "error" not in out[0]
    assert first == 5 + 3 and (tmp_path / "xdg" / "safe_jax" / "subjects.sqlite").is_file()
    with LoopbackOpenAI() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert main(args) == 0
        assert srv.chat_count() == 1  # only the failed caption
        assert main(args) == 0
        assert srv.count == 1  # the second re-run asks nothing
    assert "6 from cache, 0 requests" in capsys.readouterr().err


def test_manual_dir_writes_subjects_of_records_without_any(tmp_path, no_key, capsys):
    """The step before an ANCHOR build: the manual directory read as the builder reads it (bad lines
    skipped, captions on one line), subjects only for records without any, into DIR/subjects.jsonl."""
    pytest.importorskip("tensorflow_datasets")
    manual = tmp_path / "manual"
    manual.mkdir()
    write_jsonl(manual / "anchor.jsonl", [
        {"id": "a", "caption": "Firefighters at a flooded\n street   in Leeds.", "image": "a.jpg"},
        {"id": "b", "caption": BORIS, "image": "b.jpg", "subjects": ["Boris Johnson"]},
        '{"id": "c", "caption": "unterminated',
        {"id": 7, "caption": BORIS, "image": "c.jpg"},
    ])
    assert main(["--manual-dir", str(manual), "--quiet"]) == 0
    assert read_jsonl(manual / "subjects.jsonl") == [
        {"id": "a", "subjects": ["Leeds", "Firefighters", "flooded street"]},
        {"id": "7", "subjects": ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"]}]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--manual-dir", str(manual), "--in", str(manual / "anchor.jsonl")])
    assert e.value.code == 2
    assert "--in and --manual-dir exclude each other" in capsys.readouterr().err
    assert main(["--manual-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safe-jax subjects: error: ") and "anchor.jsonl" in err and "\n" not in err


def test_demo_runs_as_a_module_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    res = subprocess.run([sys.executable, "-m", "launch.subjects", "--demo"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    first = json.loads(res.stdout.splitlines()[0])
    assert first["subjects"] == ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"]


def test_a_killed_run_loses_no_answer_and_leaves_no_half_file(tmp_path, monkeypatch):
    """SIGKILL mid-run: the output file is absent (not truncated) and every answer already
    received is in the cache, so the re-run asks only for the rest."""
    n = 60
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "caption": f"Protest number {i} in Rome."} for i in range(n)])
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    with LoopbackOpenAI(delay=0.03) as srv:
        env = dict(os.environ, OPENAI_API_KEY="sk-kill-test-key", OPENAI_BASE_URL=srv.base_url)
        proc = subprocess.Popen([sys.executable, "-m", "launch.subjects", "--in", str(inp), "--out", str(out),
                                 "--cache", str(cache), "--concurrency", "2", "--rate", "0", "--quiet"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while srv.chat_count() < 15 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        asked = srv.chat_count()
    assert 15 <= asked < n and not out.exists()
    saved = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert asked - 2 <= saved <= asked  # at most the requests in flight were lost
    with LoopbackOpenAI() as srv:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-kill-test-key")
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert main(["--in", str(inp), "--out", str(out), "--cache", str(cache), "--quiet", "--rate", "0"]) == 0
        assert srv.chat_count() == n - saved
    assert len(read_jsonl(out)) == n
