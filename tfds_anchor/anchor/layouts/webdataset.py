"""Webdataset tar shards as img2dataset writes them: per sample ``<key>.jpg`` (or ``.png``,
``.webp``), ``<key>.txt`` (the caption) and ``<key>.json`` (``status``, and any of ``id``,
``caption``, ``source``, ``subjects``, ``entity``, ``split``).

Shards are read in order, member after member, one sample in memory at a time (its image read
only when its split is the one being written); nothing is extracted to disk, so member names
cannot point anywhere. A member larger than the cap is skipped unread, a link or device member is
never followed, and a shard cut short costs the sample it ends in (and what would have
followed), counted, not the build. A sample whose json ``status`` is not ``success`` is counted
as not downloaded.
"""

from __future__ import annotations

import json
import re
import tarfile
from typing import Any, BinaryIO, Iterator

from tfds_anchor.anchor import records as fields
from tfds_anchor.anchor.build_report import BuildReport
from tfds_anchor.anchor.records import Record
from tfds_anchor.anchor.safe_files import SIDECAR_MAX_BYTES, ManualDir, Unreadable, join

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_SIDECARS = ("txt", "json")
# webdataset's rule: the key is the member's path up to the first dot of its file name.
_KEY = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


class TarShards:
    """The ``webdataset`` layout."""

    name = "webdataset"

    def __init__(self, dirs: ManualDir, settings: Any):
        self.dirs = dirs

    def _files(self) -> list[str]:
        return [join(folder, name) for folder, entries in self.dirs.walk() for name, _ in entries
                if name.lower().endswith(".tar")]

    def check(self) -> None:
        from tfds_anchor.anchor.layouts.settings import LayoutError

        if not self._files():
            raise LayoutError(f"layout 'webdataset': no *.tar shard under {self.dirs}")

    def records(self, report: BuildReport, split: str | None = None) -> Iterator[Record]:
        for relative in self._files():
            file_split = fields.split_from_path(relative, shard=True)
            if split is not None and file_split is not None and file_split != split:
                continue
            try:
                with self.dirs.open(relative) as f:
                    yield from self._shard(f, relative, file_split, split, report)
            except Unreadable as e:
                report.skip(e.reason, relative)

    def _shard(self, f: BinaryIO, relative: str, file_split: str | None, split: str | None,
               report: BuildReport) -> Iterator[Record]:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except _TAR_ERRORS:
            report.skip("unreadable_file", relative)
            return
        key, parts, offset = None, {}, 0
        while True:
            try:
                member = tar.next()
            except _TAR_ERRORS:
                self._truncated(key, relative, report)
                return
            tar.members = []  # tarfile keeps every header it reads; a shard is read once, in order
            if member is None:
                break
            match = _KEY.match(member.name)
            if not match:
                continue
            member_key, ext = match.group(1), match.group(2).lower()
            if member_key != key:
                if key is not None:
                    record = self._sample(tar, key, parts, relative, offset, file_split, split, report)
                    if record is not None:
                        yield record
                key, parts, offset = member_key, {}, member.offset
            if ext not in IMAGE_EXTENSIONS and ext not in _SIDECARS:
                continue
            if not member.isreg():
                parts[ext] = Unreadable("special_file", member.name)  # a link or device entry: never followed
                continue
            limit = self.dirs.max_file_bytes if ext in IMAGE_EXTENSIONS else min(SIDECAR_MAX_BYTES,
                                                                               self.dirs.max_file_bytes)
            if member.size > limit:
                parts[ext] = Unreadable("oversize_file", member.name)
                continue
            if ext in IMAGE_EXTENSIONS:
                parts[ext] = member  # read once the sample is known to be wanted (the shard is seekable)
                continue
            try:
                parts[ext] = tar.extractfile(member).read()
            except _TAR_ERRORS:
                self._truncated(key, relative, report)
                return
        if key is not None:
            record = self._sample(tar, key, parts, relative, offset, file_split, split, report)
            if record is not None:
                yield record

    @staticmethod
    def _truncated(key: str | None, relative: str, report: BuildReport) -> None:
        report.records_read += 1
        report.skip("truncated_member", key if key is not None else relative)

    def _sample(self, tar: tarfile.TarFile, key: str, parts: dict[str, Any], relative: str, offset: int,
                file_split: str | None, split: str | None, report: BuildReport) -> Record | None:
        """The record of one sample; its image is read only where its split is wanted."""
        report.records_read += 1
        meta = _json(parts.get("json"), report)
        given_id = meta.get("id") if fields.text(meta.get("id")) else key
        rid = fields.record_id(given_id, report)
        if rid is None:
            return None
        status = meta.get("status")
        if status is not None and status != "success":
            report.skip("not_downloaded", rid)
            return None
        text = parts.get("txt")
        if isinstance(text, Unreadable):
            report.skip(text.reason, rid)
            return None
        caption = fields.caption(text if text is not None else meta.get("caption"), rid, report)
        if caption is None:
            return None
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if isinstance(image, Unreadable):
            report.skip(image.reason, rid)
            return None
        if image is None:
            report.skip("missing_image", rid)
            return None
        record_split = fields.split(meta.get("split"), rid, report, file_split)
        if split is not None and record_split != split:
            return None  # another split's sample: its image is not read
        try:
            data = tar.extractfile(image).read()
        except _TAR_ERRORS:
            report.skip("truncated_member", rid)
            return None
        if not data:
            report.skip("missing_image", rid)
            return None
        origin = f"{relative}:{offset}"
        return Record(
            id=rid,
            caption=caption,
            source=fields.source(meta.get("source"), rid, report),
            image=origin,
            subjects=fields.subjects(meta.get("subjects")),
            entity=fields.entity(meta.get("entity")),
            split=record_split,
            image_bytes=data,
            origin=origin,
            entity_subset=fields.subset_from_path(relative),
        )


def _json(data: Any, report: BuildReport) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        meta = json.loads(data) if isinstance(data, bytes) else None
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        report.note("<key>.json members that are not a readable JSON object (ignored)")
        return {}
    return meta
