"""One record of any layout, and the field values every layout reads the same way.

Each layout (ours, the authors' folders, imagefolder, parquet, webdataset) finds its ids,
captions, sources, splits and subsets in its own places; these helpers turn what it found into
the same Record, so the same data in two layouts gives the same examples. Reading is tolerant:
ids may be numbers, ``subjects`` a list, a JSON list or a ``;``-separated string, a split any
common spelling. A record that cannot be used is counted in the BuildReport by reason and left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from tfds_anchor.anchor.build_report import BuildReport
from tfds_anchor.anchor.sources import normalise_source

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# Hash split, in percent: where the data gives no split.
_TRAIN_PERCENT, _VALIDATION_PERCENT = 90, 5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# The authors' ids name their source after a number: "61772washington_post", "595103guardian".
_ID_SOURCE = re.compile(r"^\d+_?([A-Za-z][A-Za-z_]*)$")
# A shard's name may start with its split: "train-00000-of-00004.parquet", "val_0001.tar".
_SHARD_SPLIT = re.compile(r"^([A-Za-z]+)(?:[-_.]|$)")


@dataclasses.dataclass
class Record:
    id: str
    caption: str
    source: Any
    image: str | None              # relative to the manual directory (None for in-memory images)
    subjects: list[str] | None     # None: not given (stored as an empty list)
    entity: str
    split: str
    image_bytes: bytes | None = None  # images carried inside a container (parquet, tar) or drawn (sample)
    # Where the record was read ("anchor.jsonl:12", "train/1guardian.jpg", "a.parquet#40"): unique per
    # record read, so that a build's passes agree on which record is which.
    origin: str = ""
    entity_subset: bool | None = None  # from a folder name; None: decided by ``entity``

    def is_entity(self) -> bool:
        return self.entity_subset if self.entity_subset is not None else bool(self.entity)


def hash_split(record_id: str) -> str:
    """A split that depends on the id alone, so it never changes when records are added or removed."""
    bucket = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < _TRAIN_PERCENT:
        return "train"
    return "validation" if bucket < _TRAIN_PERCENT + _VALIDATION_PERCENT else "test"


def split_from_path(relative: str, *, shard: bool = False) -> str | None:
    """The split a path names: its deepest folder named like a split, else (for a shard file, never an
    image, whose name is an id) its name's first word ("train-00000.parquet")."""
    parts = relative.replace("\\", "/").split("/")
    for folder in reversed(parts[:-1]):
        if folder.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[folder.lower()]
    if shard:
        match = _SHARD_SPLIT.match(parts[-1])
        if match and match.group(1).lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[match.group(1).lower()]
    return None


def subset_from_path(relative: str) -> bool | None:
    """True under a folder named for ANCHOR Entity ("entity", "anchor_entity"), False under a
    non-entity one ("non_entity", "NonEntity"), None where no folder says."""
    for folder in reversed(relative.replace("\\", "/").split("/")[:-1]):
        word = re.sub(r"[^a-z]", "", folder.lower())
        if "nonentity" in word:
            return False
        if "entity" in word:
            return True
    return None


def source_from_id(record_id: str) -> str | None:
    match = _ID_SOURCE.match(record_id)
    return match.group(1).lower() if match else None


# ---------------------------------------------------------------------------------- field values
def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def subjects(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None  # an empty CSV cell: not given
        if value.startswith("["):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                value = value.strip("[]").split(",")
        else:
            value = value.split(";")
    if not isinstance(value, (list, tuple)):
        return None
    return [s.strip() for s in value if isinstance(s, str) and s.strip() and is_utf8(s)]


def entity(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(v.strip() for v in value if isinstance(v, str) and v.strip())
    found = text(value)
    return found.strip() if found and is_utf8(found) else ""


def record_id(value: Any, report: BuildReport) -> str | None:
    found = text(value)
    found = found.strip() if found else ""
    if not found or not is_utf8(found):
        report.skip("missing_id", None)
        return None
    return found


def caption(value: Any, rid: str, report: BuildReport) -> str | None:
    """One line: newlines and runs of spaces in captions are noise."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError:
            report.skip("non_utf8_caption", rid)
            return None
    if not isinstance(value, str) or not value.strip():
        report.skip("empty_caption", rid)
        return None
    if not is_utf8(value):
        report.skip("non_utf8_caption", rid)
        return None
    return " ".join(value.split())


def split(value: Any, rid: str, report: BuildReport, path_split: str | None = None) -> str:
    """The record's own split, else its path's, else a hash of its id."""
    given = text(value)
    if given and given.strip():
        named = SPLIT_ALIASES.get(given.strip().lower())
        if named is not None:
            return named
        report.note("split not train/validation/test: split by id hash" if path_split is None
                    else "split not train/validation/test: split by folder")
    return path_split or hash_split(rid)


def source(value: Any, rid: str, report: BuildReport) -> Any:
    """The record's own source, else the one its id names ("595103guardian"); an unknown one is kept
    as it is (stored as "other") and counted."""
    given = text(value)
    if given and given.strip():
        return value
    from_id = source_from_id(rid)
    if from_id and normalise_source(from_id) == "other":
        report.note(f"ids naming an unknown source {from_id!r} (stored as other)")
    return from_id
