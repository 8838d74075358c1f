"""Which layout a manual directory holds, found from its file names alone (nothing is opened).

Ours is looked for first, then imagefolder's metadata, webdataset tar shards (before parquet:
img2dataset writes a metadata parquet beside each tar), parquet files, and last the authors'
folders of ``<id>.<image>`` + ``<id>.txt``. A directory holding none of them is one line naming
what was looked for.
"""

from __future__ import annotations

import os
from typing import Any

from tfds_anchor.anchor.records import IMAGE_EXTENSIONS
from tfds_anchor.anchor.safe_files import ManualDir

LAYOUTS = ("anchor", "folders", "imagefolder", "parquet", "webdataset")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder's


def detect(dirs: ManualDir) -> str:
    from tfds_anchor.anchor.manual import CSV_NAME, JSONL_NAME

    if dirs.exists(JSONL_NAME) or dirs.exists(CSV_NAME):
        return "anchor"
    found = set()
    for _, entries in dirs.walk():
        names = {name for name, _ in entries}
        for name, kind in entries:
            lower = name.lower()
            if lower in METADATA_NAMES:
                return "imagefolder"
            if lower.endswith(".tar"):
                found.add("webdataset")
            elif lower.endswith(".parquet"):
                found.add("parquet")
            elif lower.endswith(IMAGE_EXTENSIONS) and os.path.splitext(name)[0] + ".txt" in names:
                found.add("folders")
    for layout in ("webdataset", "parquet", "folders"):
        if layout in found:
            return layout
    raise FileNotFoundError(
        f"{dirs} holds no layout the anchor builder reads: neither {JSONL_NAME} nor {CSV_NAME} (ours), "
        f"nor metadata.jsonl/metadata.csv (imagefolder), *.tar (webdataset), *.parquet, or <id>.jpg with "
        f"<id>.txt (folders); see the manual download instructions (tfds_anchor/anchor/README.md)")


def open_layout(settings: Any, dirs: ManualDir) -> Any:
    """The reader of ``settings.layout``: ``check()`` before the build, ``records(report, split)``."""
    if settings.layout == "anchor":
        from tfds_anchor.anchor.manual import AnchorFiles as reader
    elif settings.layout == "folders":
        from tfds_anchor.anchor.layouts.folders import Folders as reader
    elif settings.layout == "imagefolder":
        from tfds_anchor.anchor.layouts.imagefolder import ImageFolder as reader
    elif settings.layout == "parquet":
        from tfds_anchor.anchor.layouts.parquet import ParquetFiles as reader
    elif settings.layout == "webdataset":
        from tfds_anchor.anchor.layouts.webdataset import TarShards as reader
    else:
        raise ValueError(f"unknown layout {settings.layout!r}")
    return reader(dirs, settings)
