"""World batches drawn on the fly: the batch at step s is a pure function of (seed, s).

Pre-training never reads a dataset from disk: every example is drawn when it is needed, from
``(seed, index)`` alone, and step ``s`` takes the training examples of slots ``s·B … s·B + B − 1``.
So a resumed run needs no iterator state to continue exactly (the checkpoint records the stream
only to warn when it changed), and any batch can be drawn again.

What is never trained on, so that held-out numbers mean something:
- the world's held-out *combinations*: ``tfds_anchor.anchor.world.combination_split`` puts each
  combination of scene, people, landmark and city in train, validation or test; a training slot
  takes the first of its candidates ``(seed, 8·slot + r)``, r = 0, 1, …, whose combination is in
  train, so no validation or test combination is ever seen (every single subject is);
- the held-out *seed*: training streams use ``data.seed`` in [0, HELD_OUT_SEED); the held-out
  examples are seed ``HELD_OUT_SEED`` (1 000 000), validation and test combinations only.

The world is ``tfds_anchor.anchor.world`` (the generator ``anchor/sample`` and
``anchor/synthetic`` store too); ``World.name`` names it in the stream's description.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import logging
from typing import Any, Callable, Sequence

import numpy as np

from safe_jax.errors import SafeJaxError

log = logging.getLogger(__name__)

HELD_OUT_SEED = 1_000_000
KINDS = ("person", "place", "other")
_CANDIDATES = 8  # world examples per training slot (the first in the train split is taken)


@dataclasses.dataclass(frozen=True)
class Subject:
    text: str        # as the caption writes it
    kind: str        # person, place or other
    signature: str   # what it shows: two phrases with one signature are the same subject


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray                # uint8 [S, S, 3]
    caption: str
    subjects: tuple[Subject, ...]
    split: str | None                # the world's combination split; None when it has none


def _normalised(text: str) -> str:
    return " ".join(text.lower().removeprefix("the ").split())


def _subject(item: Any) -> Subject:
    """A subject in any shape a world gives: "text", (text, kind) or {"text", "kind", "signature"}."""
    if isinstance(item, str):
        text, kind, signature = item, "other", None
    elif isinstance(item, dict):
        text, kind, signature = item.get("text"), item.get("kind", "other"), item.get("signature")
    else:
        text, kind, signature = item[0], item[1] if len(item) > 1 else "other", None
    text = str(text)
    return Subject(text, kind if kind in KINDS else "other", str(signature or _normalised(text)))


class World:
    """The scene generator, the same for every run on every machine: ``draw(seed, index)`` is one
    captioned picture of ``image_size``², from ``np.random.default_rng([seed, index])`` alone."""

    def __init__(self, image_size: int):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise SafeJaxError(f"data.image_size must be an integer ≥ 16, got {image_size!r}")
        self.image_size = image_size
        if importlib.util.find_spec("tfds_anchor.anchor.world") is None:
            raise SafeJaxError("pretraining draws the synthetic news world, tfds_anchor.anchor.world, which is not "
                               "installed")
        module = importlib.import_module("tfds_anchor.anchor.world")
        missing = [f for f in ("sample_scene", "draw", "caption") if not hasattr(module, f)]
        if missing:
            raise SafeJaxError(f"tfds_anchor.anchor.world lacks {', '.join(missing)}")
        self._world = module
        self.name = "world"

    def draw(self, seed: int, index: int) -> Example:
        rng = np.random.default_rng([seed, index])
        size = (self.image_size, self.image_size)
        # the order of world.example: spec, caption, picture
        spec = self._world.sample_scene(rng)
        caption, subjects = self._world.caption(spec, rng)
        image = np.asarray(self._world.draw(spec, size)[0], np.uint8)
        split = self._world.combination_split(spec) if hasattr(self._world, "combination_split") else None
        if image.shape != (self.image_size, self.image_size, 3):
            raise SafeJaxError(f"the world drew a {image.shape} picture, not {self.image_size}×{self.image_size} RGB")
        return Example(image, caption, tuple(_subject(s) for s in subjects), split)


@functools.lru_cache(maxsize=4)
def world(image_size: int) -> World:
    return World(image_size)


def training_example(w: World, seed: int, slot: int) -> Example:
    """The example of training slot ``slot``: its first candidate whose combination is in train."""
    for r in itertools.count():
        example = w.draw(seed, _CANDIDATES * slot + r)
        if example.split in (None, "train"):
            return example
    raise AssertionError("unreachable")


def held_out(w: World, n: int) -> list[Example]:
    """The first ``n`` held-out examples: seed ``HELD_OUT_SEED``, combinations never trained on."""
    found: list[Example] = []
    for index in itertools.count():
        if len(found) == n:
            return found
        example = w.draw(HELD_OUT_SEED, index)
        if example.split != "train":
            found.append(example)
    raise AssertionError("unreachable")


def images_uint8(examples: Sequence[Example]) -> np.ndarray:
    return np.stack([e.image for e in examples])


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1], as the VAE and the diffusion step take images."""
    return images.astype(np.float32) / 127.5 - 1.0


class StepBatches:
    """``batches(step)`` → the numpy batch of that step: ``assemble(examples, rng)``, where ``rng``
    is the step's own generator for choices made per batch (e.g. which text stands for a picture).

    The next ``prefetch`` batches are drawn in a background thread while the current step runs.
    ``record(step)`` is the data position the train Checkpointer stores beside the state: the step
    itself is the position, so it also names the stream, and ``check`` on restore warns when the
    stream changed.
    """

    def __init__(self, w: World, seed: int, batch_size: int,
                 assemble: Callable[[list[Example], np.random.Generator], dict], prefetch: int = 2):
        if not 0 <= seed < HELD_OUT_SEED:
            raise SafeJaxError(f"data.seed must be in [0, {HELD_OUT_SEED}) (seed {HELD_OUT_SEED} is held out), "
                               f"got {seed}")
        self.world, self.seed, self.batch_size, self.assemble = w, seed, batch_size, assemble
        self.prefetch = max(int(prefetch), 0)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="world") if self.prefetch else None
        self._pending: dict[int, concurrent.futures.Future] = {}

    def draw(self, step: int) -> dict:
        first = step * self.batch_size
        examples = [training_example(self.world, self.seed, first + j) for j in range(self.batch_size)]
        return self.assemble(examples, np.random.default_rng([self.seed, step, 1]))  # 3 words: not a world draw

    def __call__(self, step: int) -> dict:
        if self._pool is None:
            return self.draw(step)
        for s in list(self._pending):
            if s < step:
                self._pending.pop(s).cancel()
        for s in range(step, step + self.prefetch + 1):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self.draw, s)
        return self._pending.pop(step).result()

    def _identity(self) -> dict:
        return {"world": self.world.name, "image_size": self.world.image_size, "seed": self.seed,
                "batch_size": self.batch_size}

    def record(self, step: int) -> dict:
        return {**self._identity(), "step": step}

    def check(self, saved: dict) -> None:
        saved = dict(saved)
        saved.pop("step", None)
        changed = {k: (saved.get(k), v) for k, v in self._identity().items() if saved.get(k) != v}
        if changed:
            log.warning("the data stream changed since the checkpoint (%s): the resumed run is not the same run",
                        ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changed.items()))

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
