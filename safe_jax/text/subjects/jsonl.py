"""The CLI's files: one JSON object a line in (``id``, ``caption``) and out (``id``, ``subjects``).

Input errors name the line. Output is written to a temporary file beside the target and renamed
over it, so a crash never leaves a half-written line or a truncated file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, TextIO

from safe_jax.errors import SafeJaxError
from safe_jax.io import atomic
from safe_jax.text.subjects.extractor import Record, SubjectResult


def parse_records(lines: Iterable[str], name: str) -> list[Record]:
    records, first_line = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise SafeJaxError(f"{name} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise SafeJaxError(f"{name} line {n}: expected a JSON object with 'id' and 'caption'")
        for field in ("id", "caption"):
            if field not in obj:
                raise SafeJaxError(f"{name} line {n}: missing field {field!r}")
        if not isinstance(obj["caption"], str):
            raise SafeJaxError(f"{name} line {n}: 'caption' must be a string")
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise SafeJaxError(f"{name} line {n}: 'id' must be a string or an integer")
        key = json.dumps(obj["id"])
        if key in first_line:
            raise SafeJaxError(f"{name} line {n}: duplicate id {obj['id']!r} (first on line {first_line[key]})")
        first_line[key] = n
        records.append(Record(obj["id"], obj["caption"]))
    return records


def read_records(path: str | Path) -> list[Record]:
    if str(path) == "-":
        return parse_records(sys.stdin, "stdin")
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return parse_records(f, str(path))
    except FileNotFoundError:
        raise SafeJaxError(f"missing file: {path}") from None
    except UnicodeDecodeError as e:
        raise SafeJaxError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _write_lines(f: TextIO, results: Iterable[SubjectResult]) -> int:
    n = 0
    for r in results:
        obj = {"id": r.id, "subjects": r.subjects}
        if r.error is not None:
            obj["error"] = r.error
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        n += 1
    return n


def write_results(path: str | Path, results: Iterable[SubjectResult]) -> int:
    """Write atomically (temp file, fsync, rename); returns the number of lines."""
    if str(path) == "-":
        return _write_lines(sys.stdout, results)
    with atomic.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        return _write_lines(f, results)
