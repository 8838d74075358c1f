"""Reading the manual directory so that no file placed in it can hang, exhaust or leak out of a build.

A manual directory holds data we did not make. A name like ``x.jpg`` may be a FIFO (reading it
waits forever for a writer), a device (``/dev/zero`` never ends), a socket, a directory, a symlink
to anywhere on the machine, or a file of many gigabytes. So every file is opened here, and only
here, in one way: the path is resolved and must stay inside the manual directory (a symlink is
followed only when its target is inside too); it is opened without following a last symlink and
without blocking; the open descriptor, not the path (which may change in between), is asked
whether it is a regular file and how large it is; only then is it read, never past the cap. On
Linux the descriptor's real path is checked once more, so a folder swapped for a symlink after
the path was resolved is caught too. What cannot be read raises ``Unreadable`` with a reason of
the build report: the record is skipped and counted, and the build goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import BinaryIO, Iterator

DEFAULT_MAX_FILE_MB = 64
MIB = 1 << 20
# Captions and JSON sidecars are sentences, not images: a much smaller cap keeps a stray large file
# named `x.txt` from being read whole.
SIDECAR_MAX_BYTES = 1 * MIB

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))
_PROC_FD = "/proc/self/fd"


class Unreadable(Exception):
    """A file that is not read; ``reason`` is a key of ``build_report.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ManualDir:
    """The manual directory, as the only way the build reads a file of it."""

    def __init__(self, root: str | os.PathLike, max_file_bytes: int = DEFAULT_MAX_FILE_MB * MIB):
        self.root = os.path.realpath(os.fspath(root))
        self.max_file_bytes = max_file_bytes
        self._check_fd_path = os.path.isdir(_PROC_FD)
        self.unfollowed: set[str] = set()  # symlinked folders leading out of the manual directory

    def __str__(self) -> str:
        return self.root

    # ------------------------------------------------------------------ paths
    def exists(self, relative: str) -> bool:
        """Whether anything (even a dangling symlink or a FIFO) has this name: for detection, never read."""
        return os.path.lexists(os.path.join(self.root, relative))

    def inside(self, real: str) -> bool:
        return real == self.root or os.path.commonpath([self.root, real]) == self.root

    def _real(self, relative: str) -> str:
        parts = relative.replace("\\", "/").split("/")
        if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")) or ".." in parts:
            raise Unreadable("unsafe_image_path", relative)
        try:
            real = os.path.realpath(os.path.join(self.root, relative))
        except (ValueError, OSError) as e:  # a NUL byte in the name, a name too long
            raise Unreadable("unsafe_image_path", f"{relative!r}: {e}") from None
        if not self.inside(real):
            raise Unreadable("link_outside", f"{relative} -> {real}")
        return real

    # ------------------------------------------------------------------ reading
    def _open_regular(self, relative: str) -> tuple[int, os.stat_result]:
        """A descriptor of a regular file inside the manual directory, and its stat."""
        real = self._real(relative)
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            raise Unreadable("missing_image", relative) from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink loop, or a symlink swapped in after resolving: never followed
                raise Unreadable("unreadable_file", f"{relative}: a symlink that cannot be resolved") from None
            if e.errno == errno.ENXIO:  # a socket (or a device without a driver)
                raise Unreadable("special_file", relative) from None
            if e.errno == errno.EISDIR:
                raise Unreadable("not_a_file", relative) from None
            raise Unreadable("unreadable_file", f"{relative}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Unreadable("not_a_file", relative)
            if not stat.S_ISREG(st.st_mode):
                raise Unreadable("special_file", relative)  # FIFO, character or block device, socket
            if self._check_fd_path:
                try:
                    actual = os.readlink(f"{_PROC_FD}/{fd}")
                except OSError:
                    actual = None
                if actual is not None and actual.startswith("/") and not self.inside(actual.removesuffix(" (deleted)")):
                    raise Unreadable("link_outside", f"{relative} -> {actual}")
        except Unreadable:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise Unreadable("unreadable_file", f"{relative}: {e.strerror}") from None
        return fd, st

    def read(self, relative: str, limit: int | None = None) -> bytes:
        """The bytes of a regular file inside the manual directory, at most ``limit`` (the cap) of them."""
        limit = self.max_file_bytes if limit is None else limit
        fd, st = self._open_regular(relative)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > limit:
                raise Unreadable("oversize_file", f"{relative}: {st.st_size} bytes > {limit}")
            want = st.st_size + 1  # one byte more tells a file that grew since fstat
            try:
                data = f.read(want)
                if len(data) == want:  # it grew: read on, up to one byte past the cap
                    data += f.read(limit + 1 - len(data))
            except OSError as e:
                raise Unreadable("unreadable_file", f"{relative}: {e.strerror}") from None
        if len(data) > limit:
            raise Unreadable("oversize_file", f"{relative}: more than {limit} bytes")
        return data

    @contextlib.contextmanager
    def open(self, relative: str) -> Iterator[BinaryIO]:
        """A regular file inside the manual directory, for streaming (metadata, tar and parquet shards).

        No size cap: these are read piece by piece, each piece capped where it is used.
        """
        fd, _ = self._open_regular(relative)
        with os.fdopen(fd, "rb") as f:
            yield f

    # ------------------------------------------------------------------ listing
    def walk(self, top: str = "") -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """``(folder, [(name, kind), ...])`` for every folder under ``top``, depth first, names sorted.

        ``kind`` is "dir", "file", "link" or "special", from the folder entry itself (nothing is
        opened). A symlinked folder is walked like a folder when it resolves inside the manual
        directory and was not walked yet (no loops, nothing twice); one leading out is not walked,
        and its path is kept in ``unfollowed`` for the build report. Hidden names (``.cache``,
        ``.DS_Store``) are left out. Memory holds one folder's names at a time.
        """
        stack = [top]
        walked = {os.path.realpath(os.path.join(self.root, top))}
        while stack:
            folder = stack.pop()
            entries = []
            try:
                with os.scandir(os.path.join(self.root, folder)) as it:
                    for entry in it:
                        if entry.name.startswith("."):
                            continue
                        try:
                            if entry.is_symlink():
                                kind = self._link_kind(join(folder, entry.name), walked)
                            elif entry.is_dir(follow_symlinks=False):
                                real = os.path.realpath(entry.path)
                                kind = "dir" if real not in walked else "link"  # reached through a link already
                                walked.add(real)
                            elif entry.is_file(follow_symlinks=False):
                                kind = "file"
                            else:
                                kind = "special"
                        except OSError:
                            kind = "special"
                        entries.append((entry.name, kind))
            except OSError:
                continue  # unreadable folder: nothing in it can be read either
            entries.sort()
            yield folder, entries
            stack.extend(join(folder, name) for name, kind in reversed(entries) if kind == "dir")

    def _link_kind(self, relative: str, walked: set[str]) -> str:
        real = os.path.realpath(os.path.join(self.root, relative))
        if not os.path.isdir(real):
            return "link"  # a link to a file (or nowhere): judged when it is read
        if not self.inside(real):
            self.unfollowed.add(relative)
            return "link"
        if real in walked:
            return "link"
        walked.add(real)
        return "dir"


def join(folder: str, name: str) -> str:
    """A manual-directory-relative path, always with ``/``."""
    return f"{folder}/{name}" if folder else name
