"""Manual directories of the synthetic news world, for tests and benchmarks of the manual-dir builds.

The world itself (``world``, drawn into records by ``world_records``) is what the ``sample`` and
``synthetic`` configs store; this writes the same records as a manual directory in our own layout,
so a build from files can be exercised offline with pictures and captions like the real ones.
"""

from __future__ import annotations

import io
import json

import numpy as np
from etils import epath
from PIL import Image

from tfds_anchor.anchor import world_records


def with_grain(jpeg: bytes, seed: int | tuple[int, ...], quality: int = 90, sigma: float = 6.0) -> bytes:
    """The picture with film grain, re-encoded. The world's flat drawings compress to a sixth of a
    photo's size (about 20 KB against 120 KB at 768x512); benchmarks of reading and decoding want
    files as large as the photos they stand for."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)
    noise = np.random.default_rng(seed).normal(0, sigma, pixels.shape[:2] + (1,))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_manual_dir(path: epath.PathLike, n: int, *, seed: int = 0, size: tuple[int, int] = (192, 128),
                     quality: int = 90, subjects: bool = False, entities: bool = True,
                     grain: bool = False) -> list[dict]:
    """A manual directory (``anchor.jsonl`` + ``images/``) of world records; one in five is portrait,
    so builds meet both orientations.

    Rows carry no split (the build splits them by a hash of the id, as real directories without
    one) and no ground truth (manual-directory builds store none). ``subjects=False`` leaves
    subjects out (as in a directory ``safe-jax subjects`` has not yet run over). Every world picture
    shows a named person, so with ``entities=True`` every row has an ``entity`` and belongs to
    ANCHOR Entity; ``entities=False`` leaves it out so that every row belongs to the default
    (non-entity) config. ``grain=True`` adds film grain (``with_grain``), for photo-sized files.
    Returns the rows written.
    """
    root = epath.Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(world_records.pairs(n, seed, size, quality, portrait_every=5)):
        name = f"images/{r.id}.jpg"
        (root / name).write_bytes(with_grain(r.image_bytes, (seed, i), quality) if grain else r.image_bytes)
        row = {"id": r.id, "caption": r.caption, "source": r.source, "image": name}
        if subjects:
            row["subjects"] = r.subjects
        if r.entity and entities:
            row["entity"] = r.entity
        rows.append(row)
    (root / "anchor.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows
