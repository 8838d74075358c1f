"""The evaluation's prompts: a JSONL file or a TFDS split, as (id, caption, subjects, real image).

Every prompt names the files written for it (``<id>_<seed>.png``), so ids must be unique and safe
as file names; a bad line is refused with its number before anything is loaded or generated.
Ground-truth images (for FID_CLIP and CMMD) are paths relative to the prompts file (or to
``images_root``) and must be regular files inside that directory: an evaluation reads what it
was pointed at and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from safe_jax.errors import SafeJaxError

MAX_IMAGE_BYTES = 64 * 2 ** 20
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUBJECT_KINDS = ("person", "place", "other")


@dataclass(frozen=True)
class Subject:
    text: str
    kind: str | None = None  # person / place / other, where the dataset says it


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    caption: str
    subjects: tuple[Subject, ...] | None = None  # None: the source has no subjects for it
    image_path: Path | None = None               # a ground-truth image file, or
    image_bytes: bytes | None = None             # its encoded bytes (a TFDS record)

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_bytes is not None

    @property
    def subject_texts(self) -> list[str] | None:
        return None if self.subjects is None else [s.text for s in self.subjects]

    def load_image(self) -> np.ndarray:
        """The ground-truth image as uint8 [H, W, 3]."""
        data = self.image_bytes if self.image_bytes is not None else read_regular_file(self.image_path)
        return decode_image(data, str(self.image_path or f"the image of prompt {self.id}"))


def read_regular_file(path: Path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file of at most ``limit`` bytes.

    Opened without following a final symlink and without blocking, then checked with fstat on the
    open descriptor, so a FIFO, a device or a file swapped in between check and read is never read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise SafeJaxError(f"cannot open {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SafeJaxError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise SafeJaxError(f"{path} is {info.st_size} bytes, over the {limit}-byte limit for an image")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def decode_image(data: bytes, what: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SafeJaxError(f"{what}: not a readable image ({e})") from None


def _subjects(value: Any, where: str) -> tuple[Subject, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SafeJaxError(f"{where}: 'subjects' must be a list of strings or of {{\"text\", \"kind\"}} objects")
    out = []
    for item in value:
        if isinstance(item, str):
            text, kind = item, None
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            text, kind = item["text"], item.get("kind")
            if kind is not None and kind not in SUBJECT_KINDS:
                raise SafeJaxError(f"{where}: subject kind {kind!r} is not one of {', '.join(SUBJECT_KINDS)}")
        else:
            raise SafeJaxError(f"{where}: each subject must be a string or {{\"text\": ..., \"kind\": ...}}, got {item!r}")
        if text.strip():
            out.append(Subject(text.strip(), kind))
    return tuple(out)


def _inside(root: Path, relative: str, where: str) -> Path:
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise SafeJaxError(f"{where}: 'image' must be a path relative to {root}, got {relative!r}")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise SafeJaxError(f"{where}: 'image' {relative!r} leads outside {root}")
    return root / path


def read_prompts_jsonl(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> list[EvalPrompt]:
    """Prompts from a JSONL file: ``{"id", "caption", "subjects"?, "image"?}`` per line.

    Blank lines are skipped; any other bad line is an error naming the file and line number.
    Image paths are checked to exist as regular files here, not when first scored.
    """
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent
    text = read_regular_file(path, limit=2 ** 30).decode("utf-8", errors="strict")
    prompts, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SafeJaxError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise SafeJaxError(f"{where}: each line must be a JSON object")
        unknown = set(record) - {"id", "caption", "subjects", "image", "source", "entity"}
        if unknown:
            raise SafeJaxError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                               "(known: id, caption, subjects, image, source, entity)")
        pid, caption = record.get("id"), record.get("caption")
        if isinstance(pid, int) and not isinstance(pid, bool):
            pid = str(pid)
        if not isinstance(pid, str) or not _ID.match(pid):
            raise SafeJaxError(f"{where}: 'id' must be a string of letters, digits, '.', '_' or '-' "
                               f"(it names the image files), got {record.get('id')!r}")
        if pid in seen:
            raise SafeJaxError(f"{where}: id {pid!r} already used on line {seen[pid]}")
        seen[pid] = number
        if not isinstance(caption, str) or not caption.strip():
            raise SafeJaxError(f"{where}: 'caption' must be a non-empty string")
        image = record.get("image")
        image_path = None
        if image is not None:
            if not isinstance(image, str):
                raise SafeJaxError(f"{where}: 'image' must be a path string")
            image_path = _inside(root, image, where)
            if not image_path.is_file() or image_path.is_symlink() and not image_path.resolve().is_relative_to(
                    root.resolve()):
                raise SafeJaxError(f"{where}: image {image!r} is not a regular file under {root}")
        subjects = _subjects(record.get("subjects"), where)
        if subjects is not None and record.get("entity"):
            entity = str(record["entity"]).lower()
            subjects = tuple(Subject(s.text, s.kind or ("person" if s.text.lower() == entity else None))
                             for s in subjects)
        prompts.append(EvalPrompt(pid, caption.strip(), subjects, image_path))
    if not prompts:
        raise SafeJaxError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def read_prompts_tfds(spec: str, data_dir: str | None = None) -> list[EvalPrompt]:
    """Prompts from a TFDS split ``NAME:SPLIT`` (e.g. ``anchor/sample:test``), real images included.

    A subject equal to the record's ``entity`` (ANCHOR Entity's named person) has kind person. A
    record of the synthetic world carries its ``ground_truth`` (JSON), which knows every subject's
    kind: those kinds are taken, so subject recall can be reported per kind there.
    """
    from safe_jax.data.source import as_text, as_texts, data_source

    name, _, split = spec.rpartition(":")
    if not name or not split:
        raise SafeJaxError(f"--prompts {spec!r}: expected a JSONL file or a TFDS split NAME:SPLIT")
    source = data_source(name, split, data_dir=data_dir)
    prompts, seen = [], set()
    for index in range(len(source)):
        record = source[index]
        pid = re.sub(r"[^A-Za-z0-9._-]", "_", as_text(record.get("image_id", index)))[:128] or str(index)
        if not _ID.match(pid) or pid in seen:
            pid = f"{index:06d}"
        seen.add(pid)
        entity = as_text(record.get("entity", b"")).lower()
        kinds = _ground_truth_kinds(as_text(record.get("ground_truth", b"")))
        subjects = tuple(Subject(text, kinds.get(text.strip())
                                 or ("person" if entity and text.lower() == entity else None))
                         for text in as_texts(record.get("subjects")))
        prompts.append(EvalPrompt(pid, as_text(record["caption"]), subjects if "subjects" in record else None,
                                  image_bytes=bytes(record["image"])))
    if not prompts:
        raise SafeJaxError(f"--prompts {spec}: the split is empty")
    return prompts


# The world's finer words for places, should its truth use them; any other kind is "other".
_KIND_ALIASES = {"landmark": "place", "city": "place"}


def _ground_truth_kinds(ground_truth: str) -> dict[str, str]:
    """Subject text -> kind, from a world record's ground truth; {} for real records ("") or
    truth that does not parse (kinds are then unknown, as for any real record)."""
    if not ground_truth:
        return {}
    try:
        truth = json.loads(ground_truth)
    except (json.JSONDecodeError, RecursionError):
        return {}
    items = truth.get("subjects") if isinstance(truth, dict) else None
    kinds: dict[str, str] = {}
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            kind = item.get("kind")
            kind = _KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else None
            kinds[item["text"].strip()] = kind if kind in SUBJECT_KINDS else "other"
    return kinds


def read_prompts(spec: str, *, data_dir: str | None = None, images_root: str | None = None,
                 limit: int | None = None) -> list[EvalPrompt]:
    """A JSONL file when ``spec`` is an existing path (or ends in .jsonl), else a TFDS split."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise SafeJaxError(f"--prompts {spec}: no such file")
        prompts = read_prompts_jsonl(path, images_root)
    else:
        prompts = read_prompts_tfds(spec, data_dir)
    return prompts[:limit] if limit else prompts


def write_prompts_jsonl(prompts: Sequence[EvalPrompt], path: str | os.PathLike) -> None:
    """The prompts (without images) as JSONL, so a run records exactly what it evaluated."""
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            record: dict[str, Any] = {"id": p.id, "caption": p.caption}
            if p.subjects is not None:
                record["subjects"] = [{"text": s.text, "kind": s.kind} if s.kind else s.text for s in p.subjects]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
