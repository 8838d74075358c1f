"""Hugging Face ``imagefolder``: a ``metadata.jsonl`` or ``metadata.csv`` at the root or in each split
folder, whose ``file_name`` is an image path relative to it, and a caption column.

The caption column is ``caption_column`` where given, else ``text`` or ``caption``; columns that
map onto our features are kept (``id``, ``subjects``, ``source``, ``entity``, ``split``), others
ignored. A row's split is its ``split`` column, else the folder its image is in, else a hash of its
id (the image's file name without extension, where there is no ``id`` column).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from tfds_anchor.anchor import records as fields
from tfds_anchor.anchor.build_report import BuildReport
from tfds_anchor.anchor.layouts.detect import METADATA_NAMES
from tfds_anchor.anchor.layouts.rows import columns, csv_rows, jsonl_rows
from tfds_anchor.anchor.records import Record
from tfds_anchor.anchor.safe_files import ManualDir, Unreadable, join

CAPTION_COLUMNS = ("text", "caption")
ID_COLUMNS = ("id", "image_id")


class ImageFolder:
    """The ``imagefolder`` layout."""

    name = "imagefolder"

    def __init__(self, dirs: ManualDir, settings: Any):
        self.dirs = dirs
        self.caption_column = settings.caption_column

    def _metadata_files(self) -> list[str]:
        return [join(folder, name) for folder, entries in self.dirs.walk() for name, _ in entries
                if name.lower() in METADATA_NAMES]

    def check(self) -> None:
        from tfds_anchor.anchor.layouts.settings import LayoutError

        files = self._metadata_files()
        if not files:
            raise LayoutError(f"layout 'imagefolder': no metadata.jsonl or metadata.csv under {self.dirs}")
        for relative in files:
            try:
                with self.dirs.open(relative) as f:
                    found = columns(f, _kind(relative), self.dirs.max_file_bytes)
            except Unreadable:
                continue  # skipped and counted when the build reads it
            if found is None:
                continue
            path = os.path.join(str(self.dirs), relative)
            if "file_name" not in found:
                raise LayoutError(f"{path}: no file_name column, imagefolder's image path "
                                  f"(columns: {', '.join(found)})")
            if self._caption_column(found) is None:
                wanted = repr(self.caption_column) if self.caption_column else " or ".join(CAPTION_COLUMNS)
                raise LayoutError(f"{path}: no caption column {wanted} (columns: {', '.join(found)}); "
                                  "name it with caption_column")

    def _caption_column(self, names: Any) -> str | None:
        if self.caption_column is not None:
            return self.caption_column if self.caption_column in names else None
        return next((c for c in CAPTION_COLUMNS if c in names), None)

    def records(self, report: BuildReport, split: str | None = None) -> Iterator[Record]:
        for relative in self._metadata_files():
            file_split = fields.split_from_path(relative)
            if split is not None and file_split is not None and file_split != split:
                continue
            try:
                with self.dirs.open(relative) as f:
                    rows = csv_rows(f) if _kind(relative) == "csv" else jsonl_rows(f, self.dirs.max_file_bytes)
                    for number, row in enumerate(rows, 1):
                        report.records_read += 1
                        record = self._record(row, os.path.dirname(relative), report, f"{relative}:{number}")
                        if record is not None:
                            yield record
            except Unreadable as e:
                report.skip(e.reason, relative)

    def _record(self, row: dict[str, Any] | None, folder: str, report: BuildReport, origin: str) -> Record | None:
        if row is None:
            report.skip("malformed_line")
            return None
        file_name = fields.text(row.get("file_name"))
        file_name = file_name.strip().replace("\\", "/") if file_name else ""
        given_id = next((row[c] for c in ID_COLUMNS if fields.text(row.get(c))), None)
        stem = os.path.splitext(os.path.basename(file_name))[0]
        rid = fields.record_id(given_id if given_id is not None else stem, report)
        if rid is None:
            return None
        caption = fields.caption(row.get(self._caption_column(row) or CAPTION_COLUMNS[0]), rid, report)
        if caption is None:
            return None
        if not file_name:
            report.skip("missing_image", rid)
            return None
        if file_name.startswith("/") or ".." in file_name.split("/") or not fields.is_utf8(file_name):
            report.skip("unsafe_image_path", rid)
            return None
        image = join(folder, file_name)
        return Record(
            id=rid,
            caption=caption,
            source=fields.source(row.get("source"), rid, report),
            image=image,
            subjects=fields.subjects(row.get("subjects")),
            entity=fields.entity(row.get("entity")),
            split=fields.split(row.get("split"), rid, report, fields.split_from_path(image)),
            origin=origin,
            entity_subset=fields.subset_from_path(image),
        )


def _kind(relative: str) -> str:
    return "csv" if relative.lower().endswith(".csv") else "jsonl"
