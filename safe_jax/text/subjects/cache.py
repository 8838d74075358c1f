"""Persistent answers: SQLite in WAL mode, one commit per answer, so a crash loses nothing answered.

Rows hold the model's raw phrases (validation is redone on read, so a new fuzzy threshold needs no
new requests). Keys hash backend, model, prompt version and caption. Failures are never stored, so
a re-run asks again for exactly the captions that failed. Batch API jobs in flight are recorded too,
so a re-run resumes polling them instead of paying for them twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from safe_jax.errors import SafeJaxError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL, prompt_version TEXT NOT NULL,
    caption TEXT NOT NULL, phrases TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, scope TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL, key TEXT NOT NULL, caption TEXT NOT NULL, PRIMARY KEY (batch_id, key));
"""


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/safe_jax/subjects.sqlite``, else ``~/.cache/safe_jax/subjects.sqlite``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "safe_jax" / "subjects.sqlite"


def answer_key(backend: str, model: str, prompt_version: str, caption: str) -> str:
    h = hashlib.sha256()
    for part in (backend, model, prompt_version, caption):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class SubjectCache:
    """The answer store for one (backend, model, prompt version) scope."""

    def __init__(self, path: str | Path, *, backend: str, model: str, prompt_version: str):
        self.path = Path(path).expanduser()
        self.backend, self.model, self.prompt_version = backend, model, prompt_version
        self.scope = f"{backend}\x00{model}\x00{prompt_version}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise SafeJaxError(f"cannot open the subjects cache {self.path}: {e}") from None

    def key(self, caption: str) -> str:
        return answer_key(self.backend, self.model, self.prompt_version, caption)

    def get_many(self, keys: list[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self._db.execute(
                f"SELECT key, phrases FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update((k, json.loads(p)) for k, p in rows)
        return found

    def put(self, key: str, caption: str, phrases: list[str]) -> None:
        """Store one answer and commit it at once."""
        self._db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, self.backend, self.model, self.prompt_version, caption, json.dumps(phrases), time.time()))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    # Batch API jobs in flight.
    def add_batch(self, batch_id: str, items: dict[str, str]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?)", (batch_id, self.scope, time.time()))
            self._db.executemany("INSERT OR REPLACE INTO batch_items VALUES (?, ?, ?)",
                                 [(batch_id, k, c) for k, c in items.items()])

    def pending_batches(self) -> dict[str, dict[str, str]]:
        """batch id -> {key: caption} for this scope's unfinished jobs."""
        out: dict[str, dict[str, str]] = {}
        for (batch_id,) in self._db.execute(
                "SELECT batch_id FROM batches WHERE scope = ? ORDER BY created", (self.scope,)).fetchall():
            out[batch_id] = dict(self._db.execute(
                "SELECT key, caption FROM batch_items WHERE batch_id = ?", (batch_id,)).fetchall())
        return out

    def finish_batch(self, batch_id: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM batch_items WHERE batch_id = ?", (batch_id,))
            self._db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    def close(self) -> None:
        self._db.close()
