"""JSONL and CSV rows read as a stream: a metadata file of any size costs one line of memory.

A bad line is one ``None`` (counted by the caller as a malformed line), never the end of the file;
a line longer than the cap is skipped unread rather than held in memory.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, BinaryIO, Iterator


def jsonl_rows(f: BinaryIO, max_line: int) -> Iterator[dict[str, Any] | None]:
    while True:
        line = f.readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line and not line.endswith(b"\n"):
            while True:  # the rest of an overlong line, in pieces
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        if not line.strip():
            continue
        # surrogateescape keeps undecodable bytes visible (as lone surrogates) so that only the record
        # whose caption holds them is skipped, not the whole line or file.
        text = line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        try:
            row = json.loads(text)
        except (ValueError, RecursionError):
            row = None
        yield row if isinstance(row, dict) else None


def csv_rows(f: BinaryIO) -> Iterator[dict[str, Any] | None]:
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline=""))
    try:
        if reader.fieldnames:
            reader.fieldnames = [reader.fieldnames[0].lstrip("\ufeff"), *reader.fieldnames[1:]]
        for row in reader:
            if None in row:  # more cells than header columns
                row.pop(None)
            yield row
    except csv.Error:
        yield None  # the rest of the file is unreadable as CSV: counted once as a malformed line


def columns(f: BinaryIO, kind: str, max_line: int) -> list[str] | None:
    """The columns of a metadata file: the CSV header, or the keys of the first JSON object line
    (None when there is none): enough to check a named column before a build starts."""
    if kind == "csv":
        try:
            header = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")), None)
        except csv.Error:
            return None
        return [header[0].lstrip("\ufeff"), *header[1:]] if header else None
    for row in jsonl_rows(f, max_line):
        if row is not None:
            return list(row)
    return None
