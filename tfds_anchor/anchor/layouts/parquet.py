"""Parquet files with the images inside them: what ``datasets`` writes (the predecessor ANNA ships so:
an ``image`` struct of ``bytes`` and ``path``) and what img2dataset writes (a binary ``jpg`` column,
``txt`` captions, a ``status`` per row).

One file or many, each read a row group at a time in small batches, so memory holds a batch, not
a file. A row group that cannot be read (a damaged page, a bad footer) costs its rows, counted,
not the build. The image and caption columns are ``image_column`` and ``caption_column`` where
given, else found by name (and, for the image, by type); a file whose schema has neither is one
clear line before the build. A file's split is its ``split`` column, else its folder or name
(``train-00000-of-00004.parquet``), else a hash of the id.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from tfds_anchor.anchor import records as fields
from tfds_anchor.anchor.build_report import BuildReport
from tfds_anchor.anchor.records import Record
from tfds_anchor.anchor.safe_files import ManualDir, Unreadable, join

CAPTION_COLUMNS = ("caption", "text", "txt")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes")
ID_COLUMNS = ("id", "image_id", "key")
_EXTRA_COLUMNS = ID_COLUMNS + ("source", "subjects", "entity", "split", "status")
_BATCH_ROWS = 32
_READ_BUFFER = 1 << 20  # stream column chunks through a buffer instead of reading each one whole


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from tfds_anchor.anchor.layouts.settings import LayoutError

        raise LayoutError("layout 'parquet' needs pyarrow: pip install pyarrow") from None
    return pa, pq


def _is_image_type(pa: Any, t: Any) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_image_type(pa, t.field("bytes").type)


class ParquetFiles:
    """The ``parquet`` layout."""

    name = "parquet"

    def __init__(self, dirs: ManualDir, settings: Any):
        self.dirs = dirs
        self.caption_column = settings.caption_column
        self.image_column = settings.image_column

    def _files(self) -> list[str]:
        return [join(folder, name) for folder, entries in self.dirs.walk() for name, _ in entries
                if name.lower().endswith(".parquet")]

    def _columns(self, schema: Any, relative: str) -> tuple[str, str]:
        """(image column, caption column) of a file's schema, or LayoutError naming what is missing."""
        from tfds_anchor.anchor.layouts.settings import LayoutError

        pa, _ = _pyarrow()
        path = os.path.join(str(self.dirs), relative)
        names = list(schema.names)
        if self.image_column is not None:
            if self.image_column not in names:
                raise LayoutError(f"{path}: no image column {self.image_column!r} (columns: {', '.join(names)})")
            image = self.image_column
            if not _is_image_type(pa, schema.field(image).type):
                raise LayoutError(f"{path}: column {image!r} holds {schema.field(image).type}, not image bytes "
                                  "(a binary column, or a struct with `bytes`)")
        else:
            typed = [n for n in names if _is_image_type(pa, schema.field(n).type)]
            image = next((n for n in IMAGE_COLUMNS if n in typed), typed[0] if typed else None)
            if image is None:
                raise LayoutError(f"{path}: no image column (a binary column, or a struct with `bytes`, as datasets "
                                  f"writes it; columns: {', '.join(names)})")
        if self.caption_column is not None:
            caption = self.caption_column if self.caption_column in names else None
        else:
            caption = next((n for n in CAPTION_COLUMNS if n in names), None)
        if caption is None:
            wanted = repr(self.caption_column) if self.caption_column else " or ".join(CAPTION_COLUMNS)
            raise LayoutError(f"{path}: no caption column {wanted} (columns: {', '.join(names)}); "
                              "name it with caption_column")
        return image, caption

    def check(self) -> None:
        from tfds_anchor.anchor.layouts.settings import LayoutError

        _, pq = _pyarrow()
        files = self._files()
        if not files:
            raise LayoutError(f"layout 'parquet': no *.parquet file under {self.dirs}")
        for relative in files:
            try:
                with self.dirs.open(relative) as f:
                    schema = pq.ParquetFile(f).schema_arrow
            except Unreadable:
                continue  # skipped and counted when the build reads it
            except Exception:  # not parquet, a bad footer: the same
                continue
            self._columns(schema, relative)

    def records(self, report: BuildReport, split: str | None = None) -> Iterator[Record]:
        for relative in self._files():
            file_split = fields.split_from_path(relative, shard=True)
            if split is not None and file_split is not None and file_split != split:
                continue
            try:
                with self.dirs.open(relative) as f:
                    yield from self._file(f, relative, file_split, report)
            except Unreadable as e:
                report.skip(e.reason, relative)

    def _file(self, f: Any, relative: str, file_split: str | None, report: BuildReport) -> Iterator[Record]:
        _, pq = _pyarrow()
        try:
            pf = pq.ParquetFile(f, buffer_size=_READ_BUFFER, pre_buffer=False)
            metadata = pf.metadata
        except Exception:
            report.skip("unreadable_file", relative)
            return
        image_column, caption_column = self._columns(pf.schema_arrow, relative)
        wanted = [image_column, caption_column] + [c for c in _EXTRA_COLUMNS if c in pf.schema_arrow.names
                                                   and c not in (image_column, caption_column)]
        start = 0  # the file's row index of the group's first row
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            done = 0
            try:
                for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=wanted,
                                             use_threads=False):
                    for row in batch.to_pylist():
                        index = start + done
                        done += 1
                        report.records_read += 1
                        record = self._record(row, image_column, caption_column, relative, index, file_split, report)
                        if record is not None:
                            yield record
            except Exception:  # a damaged page: the rest of this group is lost, the next one may be fine
                report.records_read += rows - done
                report.skip("unreadable_rows", f"{relative}#row-group-{group}", n=rows - done)
            start += rows

    def _record(self, row: dict[str, Any], image_column: str, caption_column: str, relative: str, index: int,
                file_split: str | None, report: BuildReport) -> Record | None:
        value = row.get(image_column)
        path = value.get("path") if isinstance(value, dict) else None
        data = value.get("bytes") if isinstance(value, dict) else value
        given_id = next((row[c] for c in ID_COLUMNS if fields.text(row.get(c))), None)
        if given_id is None:
            given_id = os.path.splitext(os.path.basename(path))[0] if isinstance(path, str) and path else None
        if given_id is None:
            given_id = f"{os.path.splitext(os.path.basename(relative))[0]}-{index}"
        rid = fields.record_id(given_id, report)
        if rid is None:
            return None
        status = row.get("status")
        if status is not None and status != "success":
            report.skip("not_downloaded", rid)
            return None
        caption = fields.caption(row.get(caption_column), rid, report)
        if caption is None:
            return None
        if not isinstance(data, bytes) or not data:
            report.skip("missing_image", rid)
            return None
        if len(data) > self.dirs.max_file_bytes:
            report.skip("oversize_file", rid)
            return None
        origin = f"{relative}#{index}"
        return Record(
            id=rid,
            caption=caption,
            source=fields.source(row.get("source"), rid, report),
            image=origin,
            subjects=fields.subjects(row.get("subjects")),
            entity=fields.entity(row.get("entity")),
            split=fields.split(row.get("split"), rid, report, file_split),
            image_bytes=data,
            origin=origin,
            entity_subset=fields.subset_from_path(relative),
        )
