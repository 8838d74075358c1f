"""Which layout a build reads, with which options: the builder config's, else ``anchor.toml``'s, else
what the manual directory is found to hold.

``anchor.toml`` sits beside the data so that ``tfds build --manual_dir DIR`` alone reads any layout
(naming a layout in a config needs ``--config '{json}'``). Every mistake in either place (an
unknown layout or key, a value of the wrong type, a file that is not TOML) is one LayoutError line,
raised before any record is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from typing import Any

from tfds_anchor.anchor.layouts import detect
from tfds_anchor.anchor.safe_files import DEFAULT_MAX_FILE_MB, MIB, ManualDir, Unreadable

LAYOUTS = detect.LAYOUTS
SETTINGS_NAME = "anchor.toml"
_KEYS = ("layout", "caption_column", "image_column", "max_file_mb")
# Layouts whose captions sit in a column (the others read them from <id>.txt files), and whose
# images sit in a column.
_CAPTION_COLUMN_LAYOUTS = ("anchor", "imagefolder", "parquet")
_IMAGE_COLUMN_LAYOUTS = ("parquet",)


class LayoutError(ValueError):
    """A layout, option or settings file a user gave that cannot work: one line saying why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    layout: str
    caption_column: str | None = None
    image_column: str | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * MIB
    origin: str = "detected"  # where the layout was named: "config", "anchor.toml" or "detected"


def check_options(where: str, *, layout: Any = None, caption_column: Any = None, image_column: Any = None,
                  max_file_mb: Any = None) -> None:
    """Raises LayoutError for an option no build could use; ``where`` names where it was given."""
    if layout is not None and layout not in LAYOUTS:
        raise LayoutError(f"{where}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    for key, value in (("caption_column", caption_column), ("image_column", image_column)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise LayoutError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if max_file_mb is not None and (isinstance(max_file_mb, bool) or not isinstance(max_file_mb, (int, float))
                                    or not math.isfinite(max_file_mb) or max_file_mb <= 0):
        raise LayoutError(f"{where}: max_file_mb must be a number > 0, got {max_file_mb!r}")


def read_settings_file(dirs: ManualDir) -> dict[str, Any]:
    """``anchor.toml``'s options (empty where there is no such file)."""
    if not dirs.exists(SETTINGS_NAME):
        return {}
    path = os.path.join(str(dirs), SETTINGS_NAME)
    try:
        raw = dirs.read(SETTINGS_NAME, limit=MIB)
    except Unreadable as e:
        raise LayoutError(f"{path}: cannot be read ({e.reason.replace('_', ' ')})") from None
    try:
        options = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise LayoutError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise LayoutError(f"{path}: not valid TOML: {' '.join(str(e).split())}") from None
    unknown = sorted(set(options) - set(_KEYS))
    if unknown:
        raise LayoutError(f"{path}: unknown key {unknown[0]!r} (the keys are {', '.join(_KEYS)})")
    check_options(path, **options)
    return options


def resolve(manual_dir: str | os.PathLike, *, layout: str | None = None, caption_column: str | None = None,
            image_column: str | None = None, max_file_mb: float | None = None) -> Settings:
    """The settings of a build: each option from the config (these arguments) where given, else from
    ``anchor.toml``, else the default; the layout detected where neither names one."""
    dirs = ManualDir(manual_dir)
    check_options("builder config", layout=layout, caption_column=caption_column, image_column=image_column,
                  max_file_mb=max_file_mb)
    from_file = read_settings_file(dirs)
    given = {"layout": layout, "caption_column": caption_column, "image_column": image_column,
             "max_file_mb": max_file_mb}
    options = {key: value if value is not None else from_file.get(key) for key, value in given.items()}
    origin = "config" if layout is not None else SETTINGS_NAME if options["layout"] is not None else "detected"
    if options["layout"] is None:
        options["layout"] = detect.detect(dirs)
    name = options["layout"]
    named = f"layout {name!r} ({'detected' if origin == 'detected' else 'named in the ' + origin})"
    if options["caption_column"] is not None and name not in _CAPTION_COLUMN_LAYOUTS:
        raise LayoutError(f"caption_column does not apply to {named}: its captions are the <id>.txt files")
    if options["image_column"] is not None and name not in _IMAGE_COLUMN_LAYOUTS:
        raise LayoutError(f"image_column applies to the parquet layout only, not to {named}")
    mb = options["max_file_mb"] if options["max_file_mb"] is not None else DEFAULT_MAX_FILE_MB
    return Settings(layout=name, caption_column=options["caption_column"], image_column=options["image_column"],
                    max_file_bytes=int(mb * MIB), origin=origin)
