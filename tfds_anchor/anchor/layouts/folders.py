"""The authors' layout: split folders (``train``, ``val``/``validation``, ``test``) of
``<id>.<image>`` with ``<id>.txt`` beside it, the source named in the id (``595103guardian``).

The same reader takes img2dataset's ``files`` output (shard folders of ``<key>.jpg``, ``.txt``,
``.json``): a folder not named like a split leaves the split to a hash of the id, and a
``<id>.json`` beside an image may give ``subjects``, ``source``, ``entity``, ``split`` and
img2dataset's ``status``. A folder named for ANCHOR Entity or non-entity puts its records in that
subset. Nothing but names is read before a record is built: its caption file is read through
ManualDir like every file, so a caption that is a FIFO or a huge file is skipped and counted.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from tfds_anchor.anchor import records as fields
from tfds_anchor.anchor.build_report import BuildReport
from tfds_anchor.anchor.records import IMAGE_EXTENSIONS, Record
from tfds_anchor.anchor.safe_files import SIDECAR_MAX_BYTES, ManualDir, Unreadable, join


class Folders:
    """The ``folders`` layout."""

    name = "folders"

    def __init__(self, dirs: ManualDir, settings: Any):
        self.dirs = dirs

    def check(self) -> None:
        from tfds_anchor.anchor.layouts.settings import LayoutError

        for _, entries in self.dirs.walk():
            names = {name for name, _ in entries}
            if any(name.lower().endswith(IMAGE_EXTENSIONS) and os.path.splitext(name)[0] + ".txt" in names
                   for name, _ in entries):
                return
        raise LayoutError(f"layout 'folders': no <id>.jpg (or another image) with its <id>.txt under {self.dirs}")

    def records(self, report: BuildReport, split: str | None = None) -> Iterator[Record]:
        for folder, entries in self.dirs.walk():
            folder_split = fields.split_from_path(join(folder, "-"))
            if split is not None and folder_split is not None and folder_split != split:
                continue  # a folder of another split: its records are not wanted now
            names = {name for name, _ in entries}
            for name, _ in entries:
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                report.records_read += 1
                record = self._record(folder, name, stem, names, folder_split, report)
                if record is not None:
                    yield record

    def _record(self, folder: str, name: str, stem: str, names: set[str], folder_split: str | None,
                report: BuildReport) -> Record | None:
        rid = fields.record_id(stem, report)
        if rid is None:
            return None
        if stem + ".txt" not in names:
            report.skip("empty_caption", rid)
            return None
        try:
            raw = self.dirs.read(join(folder, stem + ".txt"), limit=min(SIDECAR_MAX_BYTES, self.dirs.max_file_bytes))
        except Unreadable as e:
            report.skip("empty_caption" if e.reason == "missing_image" else e.reason, rid)
            return None
        meta = _sidecar(self.dirs, join(folder, stem + ".json"), report) if stem + ".json" in names else {}
        status = meta.get("status")
        if status is not None and status != "success":
            report.skip("not_downloaded", rid)
            return None
        caption = fields.caption(raw, rid, report)
        if caption is None:
            return None
        image = join(folder, name)
        return Record(
            id=rid,
            caption=caption,
            source=fields.source(meta.get("source"), rid, report),
            image=image,
            subjects=fields.subjects(meta.get("subjects")),
            entity=fields.entity(meta.get("entity")),
            split=fields.split(meta.get("split"), rid, report, folder_split),
            origin=image,
            entity_subset=fields.subset_from_path(image),
        )


def _sidecar(dirs: ManualDir, relative: str, report: BuildReport) -> dict[str, Any]:
    """A ``<id>.json`` beside an image: optional, so one that cannot be read is noted, not a skip."""
    try:
        meta = json.loads(dirs.read(relative, limit=min(SIDECAR_MAX_BYTES, dirs.max_file_bytes)))
    except (Unreadable, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        report.note("<id>.json files that are not a readable JSON object (ignored)")
        return {}
    return meta
