"""Subjects for records that have none, found while reading the data instead of while building it.

The ANCHOR builder computes no subjects: a record stored without them has an empty list. Where
such records are read for training, ``fill_missing_subjects`` finds their subjects with
``safe_jax.text.subjects`` (offline heuristics by default: no network, no API key, no cache, the same
answer in every worker process and on every host). Records that have subjects keep them.
"""

from __future__ import annotations

from typing import Any, Sequence

from safe_jax.data.source import as_text, as_texts
from safe_jax.errors import SafeJaxError


def fill_missing_subjects(captions: Sequence[Any], subjects: Sequence[Any], backend: str = "offline") -> list[list[str]]:
    """``subjects`` with every empty list replaced by the subjects ``safe_jax.text.subjects`` finds in its caption.

    ``captions`` and ``subjects`` are parallel (str or the bytes TFDS returns; ``None`` counts as
    empty). ``backend`` is ``safe_jax.text.subjects.extract``'s; keep "offline" inside an input
    pipeline, where a network call per record would stall the workers.
    """
    if len(captions) != len(subjects):
        raise SafeJaxError(f"fill_missing_subjects: {len(captions)} captions but {len(subjects)} subject lists")
    out = [as_texts(s) for s in subjects]
    todo = [i for i, s in enumerate(out) if not s]
    if todo:
        from safe_jax.text.subjects import extract

        found = extract([as_text(captions[i]) for i in todo], backend=backend, progress=False)
        for i, s in zip(todo, found):
            out[i] = s
    return out


__all__ = ["fill_missing_subjects"]
