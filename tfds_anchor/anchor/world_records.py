"""The synthetic news world as builder records: pictures, captions, subjects and ground truth.

Each record is a ``Record`` like any layout's, so the builder stores it unchanged; what a record
has beyond that (the kinds of its subjects, where each subject was drawn, the spec it was drawn
from) travels as one JSON string, ``ground_truth``, for the evaluation that judges generated
pictures against it. Splits come from ``world.combination_split``, so validation and test captions
name combinations of subjects never seen in training.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from typing import Iterator

import numpy as np
from PIL import Image

from tfds_anchor.anchor import world
from tfds_anchor.anchor.manual import Record
from tfds_anchor.anchor.sources import SOURCES


@dataclasses.dataclass
class WorldRecord(Record):
    # JSON: {"spec", "size", "subjects": [{"text", "kind", "signature", "start", "end"}],
    #        "placed": [{"signature", "kind", "name", "box"}]}
    ground_truth: str = ""


def pairs(n: int, seed: int = 0, size: tuple[int, int] = (192, 128), quality: int = 90,
          portrait_every: int = 5, *, split: str | None = None) -> Iterator[WorldRecord]:
    """``n`` records of the world with JPEG bytes in ``image_bytes``; one in ``portrait_every``
    is drawn portrait (0: none). Record ``i`` depends on (seed, i) alone.

    ``split`` keeps only that split's records, and draws no other: a split is known from the spec,
    before the caption and the picture, so a builder can stream one split at a time without
    drawing (or holding) the others.
    """
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        spec = world.sample_scene(rng)
        record_split = world.combination_split(spec)
        if split is not None and record_split != split:
            continue
        caption, subjects = world.caption(spec, rng)
        w, h = size if not portrait_every or i % portrait_every else size[::-1]
        image, truth = world.draw(spec, (w, h))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        people = [s["text"] for s in subjects if s["kind"] == "person"]
        ground_truth = {"spec": spec, "size": truth["size"], "subjects": subjects, "placed": truth["subjects"]}
        yield WorldRecord(id=f"world-{seed}-{i:05d}", caption=caption, source=SOURCES[i % 5], image=None,
                          subjects=[s["text"] for s in subjects], entity=people[0] if people else "",
                          split=record_split, image_bytes=buf.getvalue(),
                          ground_truth=json.dumps(ground_truth, sort_keys=True))


def split_counts(n: int, seed: int = 0) -> dict[str, int]:
    """How many of ``pairs(n, seed)`` fall in each split, from the specs alone (nothing drawn)."""
    return dict(collections.Counter(world.combination_split(world.sample_scene(np.random.default_rng([seed, i])))
                                    for i in range(n)))
