"""Our own layout, ``anchor.jsonl`` (or ``anchor.csv``) plus the image files; and ``subjects.jsonl``,
the subjects found before the build, which a manual directory of any layout may hold.

Reading is tolerant: unknown fields are ignored, ids may be numbers, ``subjects`` may be a list or
(CSV) a JSON list or a ``;``-separated string. A record that cannot be used is counted in the
BuildReport by reason and left out; nothing raises for one bad record. Files are streamed, so a
metadata file of any size costs one line of memory.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from tfds_anchor.anchor import records as fields
from tfds_anchor.anchor.build_report import BuildReport
from tfds_anchor.anchor.layouts.rows import columns, csv_rows, jsonl_rows
from tfds_anchor.anchor.records import SPLITS, Record, hash_split  # noqa: F401  (the names other modules use)
from tfds_anchor.anchor.safe_files import ManualDir, Unreadable

JSONL_NAME = "anchor.jsonl"
CSV_NAME = "anchor.csv"
# Subjects found before the build for records that carry none: one {"id", "subjects"} a line (what
# `safe-jax subjects --manual-dir DIR` writes). The builder itself never computes subjects.
SUBJECTS_NAME = "subjects.jsonl"


class AnchorFiles:
    """The ``anchor`` layout."""

    name = "anchor"

    def __init__(self, dirs: ManualDir, settings: Any):
        self.dirs = dirs
        self.caption_column = settings.caption_column or "caption"
        self.explicit_caption = settings.caption_column is not None
        self.metadata = JSONL_NAME if dirs.exists(JSONL_NAME) else CSV_NAME

    def check(self) -> None:
        from tfds_anchor.anchor.layouts.settings import LayoutError

        if not self.dirs.exists(self.metadata):
            raise LayoutError(f"{self.dirs} holds neither {JSONL_NAME} nor {CSV_NAME} (layout 'anchor')")
        if self.explicit_caption:
            try:
                with self.dirs.open(self.metadata) as f:
                    found = columns(f, "csv" if self.metadata == CSV_NAME else "jsonl", self.dirs.max_file_bytes)
            except Unreadable:
                return  # counted when the build reads it
            if found is not None and self.caption_column not in found:
                raise LayoutError(f"{os.path.join(str(self.dirs), self.metadata)}: no caption column "
                                  f"{self.caption_column!r} (columns: {', '.join(found)})")

    def records(self, report: BuildReport, split: str | None = None) -> Iterator[Record]:
        try:
            with self.dirs.open(self.metadata) as f:
                rows = jsonl_rows(f, self.dirs.max_file_bytes) if self.metadata == JSONL_NAME else csv_rows(f)
                for number, row in enumerate(rows, 1):
                    report.records_read += 1
                    record = self._record(row, report, f"{self.metadata}:{number}")
                    if record is not None:
                        yield record
        except Unreadable as e:
            report.skip(e.reason, self.metadata)

    def _record(self, row: dict[str, Any] | None, report: BuildReport, origin: str) -> Record | None:
        if row is None:
            report.skip("malformed_line")
            return None
        rid = fields.record_id(row.get("id"), report)
        if rid is None:
            return None
        caption = fields.caption(row.get(self.caption_column), rid, report)
        if caption is None:
            return None
        image = fields.text(row.get("image"))
        if not image or not image.strip():
            report.skip("missing_image", rid)
            return None
        image = image.strip()
        if image.startswith(("/", "\\")) or ".." in image.replace("\\", "/").split("/") or not fields.is_utf8(image):
            report.skip("unsafe_image_path", rid)
            return None
        return Record(
            id=rid,
            caption=caption,
            source=fields.source(row.get("source"), rid, report),
            image=image,
            subjects=fields.subjects(row.get("subjects")),
            entity=fields.entity(row.get("entity")),
            split=fields.split(row.get("split"), rid, report),
            origin=origin,
        )


def read_subjects(dirs: ManualDir, report: BuildReport) -> dict[str, list[str]]:
    """The manual directory's ``subjects.jsonl`` (if any), for records that carry no subjects.

    Lines that are not a JSON object with an id and a list of subjects, and lines with an ``error``
    (no answer for that caption), are counted and ignored.
    """
    if not dirs.exists(SUBJECTS_NAME):
        return {}
    found: dict[str, list[str]] = {}
    try:
        with dirs.open(SUBJECTS_NAME) as f:
            for row in jsonl_rows(f, dirs.max_file_bytes):
                rid = fields.text(row.get("id")) if row is not None else None
                if not rid or not rid.strip() or not isinstance(row.get("subjects"), list):
                    report.note(f"malformed lines in {SUBJECTS_NAME} (ignored)")
                    continue
                if row.get("error") is not None:
                    report.note(f"lines of {SUBJECTS_NAME} with an error (their records get no subjects from it)")
                    continue
                found[rid.strip()] = [" ".join(s.split()) for s in fields.subjects(row["subjects"])]
    except Unreadable as e:
        report.note(f"{SUBJECTS_NAME} not read ({e.reason})")
    return found


def read_records(manual_dir: str | os.PathLike, report: BuildReport) -> list[Record]:
    """Every usable record of a manual directory of any layout, in reading order, without images.

    For the step before the build (``safe-jax subjects --manual-dir``), which needs ids and captions
    read exactly as the build reads them. Raises FileNotFoundError where no layout is found and
    LayoutError for a bad ``anchor.toml``.
    """
    from tfds_anchor.anchor.layouts import detect, settings

    chosen = settings.resolve(manual_dir)
    reader = detect.open_layout(chosen, ManualDir(manual_dir, chosen.max_file_bytes))
    reader.check()
    kept, seen = [], set()
    for record in reader.records(report):
        if record.id in seen:
            report.skip("duplicate_id", record.id)
            continue
        seen.add(record.id)
        record.image_bytes = None
        kept.append(record)
    return kept
