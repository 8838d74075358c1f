"""Paths that may be remote: a workdir on ``gs://`` (a TPU pod has no shared disk) or any URL that
``etils.epath`` resolves through fsspec.

Local paths stay ``pathlib.Path`` so that local runs keep their exact behaviour (atomic
``os.replace``, ``fsync``, append mode). Remote paths become ``epath.Path``. Object stores differ
from a disk in two ways that matter here: an object cannot be appended to (fsspec's ``open("a")``
on GCS silently overwrites), and nothing written through a stream is visible before the stream
is closed. ``open_append`` and the tensorboardX writer factory below work around both.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Union

from etils import epath

AnyPath = Union[Path, epath.Path]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://…``, ``s3://…``) rather than a local path."""
    text = os.fspath(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def as_path(path: str | os.PathLike) -> AnyPath:
    """``epath.Path`` for a URL, ``pathlib.Path`` for anything else."""
    if is_remote(path):
        return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))
    text = os.fspath(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def open_append(path: AnyPath, every_s: float = 30.0):
    """A text file to append to: ``open(path, "a")`` locally, a ``RemoteAppender`` remotely."""
    if is_remote(path):
        return RemoteAppender(as_path(path), every_s)
    return open(path, "a", encoding="utf-8")


class RemoteAppender:
    """Append-only text for an object store: the whole text is kept in memory and the object
    rewritten on ``flush``.

    Rewriting one object (rather than one object per flush) keeps a single file that every reader,
    and the truncation on resume, handles like a local one; each upload replaces the object
    atomically, so a crash loses only the lines written since the last upload and never leaves a
    torn line. The cost is O(size) per upload, so ``flush`` uploads at most every ``every_s``
    seconds (a per-step flush would re-upload the file every step); ``sync`` and ``close`` upload
    at once. Metrics JSONL is a few hundred bytes a step, so this stays small.
    """

    def __init__(self, path: epath.Path, every_s: float = 30.0):
        self.path, self.every_s = path, every_s
        self._text = [path.read_bytes().decode("utf-8")] if path.is_file() else []
        self._last = -float("inf")
        self._dirty = False
        self.closed = False

    def write(self, text: str) -> int:
        self._text.append(text)
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.sync()

    def sync(self) -> None:
        if self._dirty and not self.closed:
            text = "".join(self._text)
            self._text = [text]
            self.path.write_bytes(text.encode("utf-8"))
            self._dirty = False
        self._last = time.monotonic()

    def close(self) -> None:
        self.sync()
        self.closed = True


class _RemoteEvents:
    """One tensorboardX event file on an object store, rewritten whole on each flush (tensorboardX
    flushes every ``flush_secs`` and on ``SummaryWriter.flush``), so a crash loses only the events
    since then. tensorboardX's own GCS writer does the same but through google-cloud-storage, and
    its ``__del__`` uploads again at interpreter exit, hanging when the server is gone. Past
    ``roll_bytes`` (image summaries add up) the next events go to a new object, named to sort
    after this one (TensorBoard reads every ``*tfevents*`` file of a folder in name order). No
    ``fileno`` (tensorboardX would ``os.fsync`` it); ``close`` may be called twice (atexit)."""

    def __init__(self, path: str, roll_bytes: int = 64 << 20):
        self._base, self._part, self.roll_bytes = path, 0, roll_bytes
        self._buffer = bytearray()
        self._dirty = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self._buffer += data
        self._dirty = True

    def flush(self) -> None:
        if self.closed or not self._dirty:
            return
        name = self._base if self._part == 0 else f"{self._base}.{self._part:04d}"
        epath.Path(name).write_bytes(bytes(self._buffer))
        self._dirty = False
        if len(self._buffer) >= self.roll_bytes:  # flush is only called between records
            self._buffer, self._part = bytearray(), self._part + 1

    def close(self) -> None:
        self.flush()
        self.closed = True


class _RemoteEventsFactory:
    def open(self, path: str) -> _RemoteEvents:
        return _RemoteEvents(path)

    def directory_check(self, path: str) -> None:  # object stores have no folders to create
        pass


def tensorboard_logdir(path: AnyPath) -> str:
    """The ``logdir`` string for tensorboardX's ``SummaryWriter``; for a URL, registers (once) the
    writer factory above for its scheme, replacing tensorboardX's own for ``gs`` and ``s3``."""
    text = os.fspath(path)
    if is_remote(text):
        from tensorboardX import record_writer

        scheme = text.split(":", 1)[0]
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _RemoteEventsFactory):
            record_writer.register_writer_factory(scheme, _RemoteEventsFactory())
    return text


def upload_tree(local: Path, dest: AnyPath) -> None:
    """Copy the folder ``local`` to ``dest`` file by file, streamed (a diffusers export is GBs).
    What writes through local-only libraries (safetensors, tokenizers) writes to a temporary
    folder first and is uploaded here; a local ``dest`` is a plain copy."""
    import shutil

    dest = as_path(dest)
    for src in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        target = dest / src.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fin, target.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
