"""Local files replaced whole or not at all, so that a reader, or a run resumed after a kill, never
sees half a file (a torn JSONL line, a truncated safetensors, an unreadable stats cache).

    with atomic.replacing(path) as tmp:   # a fresh temporary name beside ``path``
        np.savez(tmp, ...)                # any writer that takes a path
    # on success: fsync, then os.replace(tmp, path); on an exception: tmp is removed

The temporary name is unique per writer (two processes filling the same cache never write into
each other's file) and hidden; only a kill -9 can leave one behind, which ``leftovers`` finds. It
is created by the writer with the usual permissions (``tempfile.mkstemp`` would make it, and so the
final file, private to its owner).
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_TMP = ".tmp"


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TMP}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def leftovers(folder: str | os.PathLike) -> list[Path]:
    """The temporary files that killed writers left in ``folder``."""
    folder = Path(folder)
    return sorted(folder.glob(f".*{_TMP}")) if folder.is_dir() else []
