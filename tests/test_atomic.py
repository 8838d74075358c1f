"""Atomic replacement: the old file or the new one, never half; nothing left behind but what a
kill leaves, which ``leftovers`` finds."""

import os
import subprocess
import sys

import numpy as np
import pytest

from safe_jax.io import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "stats.npz"
    atomic.write_text(path, "old")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_writers_that_take_a_path_and_the_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "cache.npz"
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=np.arange(3))
    with np.load(path) as data:
        np.testing.assert_array_equal(data["x"], np.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not private, as mkstemp would make it


def test_a_killed_writer_leaves_a_file_that_leftovers_finds(tmp_path):
    path = tmp_path / "image.png"
    code = ("import os, sys; from safe_jax.io import atomic\n"
            "with atomic.replacing(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half'); os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    assert not path.exists()
    (left,) = atomic.leftovers(tmp_path)
    assert left.read_bytes() == b"half" and left.name.startswith(".image.png.")
    assert atomic.leftovers(tmp_path / "missing") == []
