"""Scores and features already computed, kept so that no re-run computes them twice.

Each metric appends to its own file under ``cache/`` as it goes (a crash loses at most the batch
in flight), keyed by the image's path and the SHA-1 of its bytes, and by the metric's identity
(its checkpoint and settings): a redrawn image or another checkpoint is scored again, never served
a stale number. ``scores.jsonl``, the file other tools read, is rebuilt from these after scoring
and replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.io import atomic


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ScoreCache:
    """``cache/scores-<metric>.jsonl``: {"image", "sha1", "identity", "values"} per scored image."""

    def __init__(self, out: Path, metric: str, identity: str):
        self.path = out / "cache" / f"scores-{metric}.jsonl"
        self.identity = identity
        self._known: dict[str, tuple[str, dict[str, float]]] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # a kill mid-write: the batch is scored again
                        continue
                    raise SafeJaxError(f"{self.path}:{number} is not valid JSON: delete the file to rescore") from None
                if record.get("identity") == identity:
                    self._known[record["image"]] = (record["sha1"], record["values"])

    def get(self, image: str, sha1: str) -> dict[str, float] | None:
        hit = self._known.get(image)
        return hit[1] if hit and hit[0] == sha1 else None

    def add(self, entries: Iterable[tuple[str, str, Mapping[str, float]]]) -> None:
        lines = []
        for image, sha1, values in entries:
            values = {k: (None if v is None else float(v)) for k, v in values.items()}
            self._known[image] = (sha1, values)
            lines.append(json.dumps({"image": image, "sha1": sha1, "identity": self.identity, "values": values}))
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())


class FeatureCache:
    """``cache/features-<metric>/<name>.npz``: one feature row per image, keyed by (key, sha1)."""

    def __init__(self, out: Path, metric: str, name: str, identity: str):
        self.path = out / "cache" / f"features-{metric}" / f"{name}.npz"
        self.identity = identity
        self._rows: dict[tuple[str, str], np.ndarray] = {}
        if self.path.exists():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    if str(data["identity"]) == identity:
                        for key, sha1, row in zip(data["keys"], data["sha1"], data["features"]):
                            self._rows[(str(key), str(sha1))] = row
            except (OSError, ValueError, KeyError):
                pass  # unreadable (a kill mid-write): recomputed

    def get(self, key: str, sha1: str) -> np.ndarray | None:
        return self._rows.get((key, sha1))

    def put(self, items: Sequence[tuple[str, str]], features: np.ndarray) -> None:
        for item, row in zip(items, np.asarray(features)):
            self._rows[item] = row

    def save(self) -> None:
        if not self._rows:
            return
        keys = sorted(self._rows)
        with atomic.replacing(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, identity=np.array(self.identity), keys=np.array([k for k, _ in keys]),
                     sha1=np.array([s for _, s in keys]), features=np.stack([self._rows[k] for k in keys]))


def write_scores(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """``scores.jsonl``: one line per image, replaced atomically."""
    atomic.write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_json(path: Path, value: Any) -> None:
    atomic.write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
