"""Reading the manual directory: ``anchor.jsonl`` (or ``anchor.csv``) plus the image files, and the
optional ``subjects.jsonl`` of subjects found before the build.

The layout is ours (the ANCHOR release's own file layout is not known here); see README.md.
Reading is tolerant: unknown fields are ignored, ids may be numbers, ``subjects`` may be a list or
(CSV) a JSON list or a ``;``-separated string. A record that cannot be used is counted in the
BuildReport by reason and left out; nothing raises for one bad record.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from typing import Any, Iterator

from etils import epath

from tfds_anchor.anchor.build_report import BuildReport

JSONL_NAME = "anchor.jsonl"
CSV_NAME = "anchor.csv"
# Subjects found before the build for records that carry none: one {"id", "subjects"} a line (what
# `safe-jax subjects --manual-dir DIR` writes). The builder itself never computes subjects.
SUBJECTS_NAME = "subjects.jsonl"
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# Hash split, in percent: where the manual data gives no split.
_TRAIN_PERCENT, _VALIDATION_PERCENT = 90, 5


@dataclasses.dataclass
class Record:
    id: str
    caption: str
    source: Any
    image: str | None              # relative to the manual directory (None for in-memory images)
    subjects: list[str] | None     # None: not given (stored as an empty list)
    entity: str
    split: str
    image_bytes: bytes | None = None  # synthetic records carry their image


def hash_split(record_id: str) -> str:
    """A split that depends on the id alone, so it never changes when records are added or removed."""
    bucket = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < _TRAIN_PERCENT:
        return "train"
    return "validation" if bucket < _TRAIN_PERCENT + _VALIDATION_PERCENT else "test"


def find_metadata(manual_dir: epath.Path) -> epath.Path:
    for name in (JSONL_NAME, CSV_NAME):
        if (manual_dir / name).exists():
            return manual_dir / name
    raise FileNotFoundError(f"{manual_dir} holds neither {JSONL_NAME} nor {CSV_NAME}; see the manual download "
                            "instructions (tfds_anchor/anchor/README.md)")


def read_records(manual_dir: epath.PathLike, report: BuildReport) -> list[Record]:
    """Every usable record of the manual directory, in file order; unusable ones are counted in ``report``."""
    path = find_metadata(epath.Path(manual_dir))
    raw = path.read_bytes()
    rows = _jsonl_rows(raw) if path.name.endswith(".jsonl") else _csv_rows(raw)
    records, seen = [], set()
    for row in rows:
        report.records_read += 1
        record = _record(row, report)
        if record is None:
            continue
        if record.id in seen:
            report.skip("duplicate_id", record.id)
            continue
        seen.add(record.id)
        records.append(record)
    return records


def add_subjects(records: list[Record], manual_dir: epath.PathLike, report: BuildReport) -> None:
    """Subjects from the manual directory's ``subjects.jsonl`` (if any) for records that carry none.

    A record's own ``subjects`` win. Lines that are not a JSON object with an id and a list of
    subjects, and lines with an ``error`` (no answer for that caption), are counted and ignored.
    """
    path = epath.Path(manual_dir) / SUBJECTS_NAME
    if not path.exists():
        return
    found: dict[str, list[str]] = {}
    for row in _jsonl_rows(path.read_bytes()):
        record_id = _text(row.get("id")) if row is not None else None
        if not record_id or not record_id.strip() or not isinstance(row.get("subjects"), list):
            report.note(f"malformed lines in {SUBJECTS_NAME} (ignored)")
            continue
        if row.get("error") is not None:
            report.note(f"lines of {SUBJECTS_NAME} with an error (their records get no subjects from it)")
            continue
        found[record_id.strip()] = [" ".join(s.split()) for s in _subjects(row["subjects"])]
    used = 0
    for record in records:
        if record.subjects is None and record.id in found:
            record.subjects = found[record.id]
            used += 1
    if used:
        report.note(f"records with subjects from {SUBJECTS_NAME}", used)


def _jsonl_rows(raw: bytes) -> Iterator[dict[str, Any] | None]:
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        # surrogateescape keeps undecodable bytes visible (as lone surrogates) so that only the record
        # whose caption holds them is skipped, not the whole line or file.
        text = line.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        yield row if isinstance(row, dict) else None


def _csv_rows(raw: bytes) -> Iterator[dict[str, Any] | None]:
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                row.pop(None)
            yield row
    except csv.Error:
        yield None  # the rest of the file is unreadable as CSV: counted once as a malformed line


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _subjects(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None  # an empty CSV cell: not given
        if value.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value.strip("[]").split(",")
        else:
            value = value.split(";")
    if not isinstance(value, (list, tuple)):
        return None
    return [s.strip() for s in value if isinstance(s, str) and s.strip() and _is_utf8(s)]


def _entity(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(v.strip() for v in value if isinstance(v, str) and v.strip())
    text = _text(value)
    return text.strip() if text and _is_utf8(text) else ""


def _record(row: dict[str, Any] | None, report: BuildReport) -> Record | None:
    if row is None:
        report.skip("malformed_line")
        return None
    record_id = _text(row.get("id"))
    record_id = record_id.strip() if record_id else ""
    if not record_id or not _is_utf8(record_id):
        report.skip("missing_id", None)
        return None
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        report.skip("empty_caption", record_id)
        return None
    if not _is_utf8(caption):
        report.skip("non_utf8_caption", record_id)
        return None
    image = _text(row.get("image"))
    if not image or not image.strip():
        report.skip("missing_image", record_id)
        return None
    image = image.strip()
    if image.startswith(("/", "\\")) or ".." in image.replace("\\", "/").split("/") or not _is_utf8(image):
        report.skip("unsafe_image_path", record_id)
        return None
    split = _text(row.get("split"))
    if split and split.strip():
        named = _SPLIT_ALIASES.get(split.strip().lower())
        if named is None:
            report.note("split not train/validation/test: split by id hash")
        split = named
    return Record(
        id=record_id,
        caption=" ".join(caption.split()),  # one line: newlines and runs of spaces in captions are noise
        source=row.get("source"),
        image=image,
        subjects=_subjects(row.get("subjects")),
        entity=_entity(row.get("entity")),
        split=split or hash_split(record_id),
    )
