"""The evaluation from prompts to ``results.json``: draw what is missing, score what is unscored.

    images/<row>/<id>_<seed>.png   drawn by safe_jax.eval.generation, settings in the PNG
    scores.jsonl                   one line per image: row, id, seed, image, one field per metric
    results.json                   per row and metric: mean, std over seeds, n, 95% bootstrap CI;
                                   FID_CLIP and CMMD per row (pooled, per seed, std)
    cache/                         what makes a re-run cheap (safe_jax.eval.score_store)

Generation comes first for every row, then each metric scores every row, so one metric model is in
memory at a time and a metric added later reuses every image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.eval import generation, statistics
from safe_jax.eval.generation import GenerationSettings, Row
from safe_jax.eval.metrics import Metric, SetMetric
from safe_jax.eval.prompts import EvalPrompt, write_prompts_jsonl
from safe_jax.eval.score_store import FeatureCache, ScoreCache, file_sha1, write_json, write_scores


@dataclass
class Evaluation:
    out: Path
    rows: Sequence[Row]
    prompts: Sequence[EvalPrompt]
    seeds: Sequence[int]
    settings: GenerationSettings
    metrics: Sequence[Metric] = ()
    batch_size: int = 8
    init_seed: int = 0
    load_pipeline: Callable[[str], tuple[Any, Any]] | None = None  # model → (pipe, params)
    progress: Callable[..., Any] | None = None  # tqdm-like: progress(total=, desc=, unit=)
    log: Callable[[str], None] = print
    _images: dict[tuple[str, str, int], Path] = field(default_factory=dict, repr=False)

    def subjects(self, prompt: EvalPrompt) -> list[str] | None:
        return prompt.subject_texts

    def _bar(self, total: int, desc: str):
        if self.progress is None or total == 0:
            return _NoBar()
        return self.progress(total=total, desc=desc, unit="img")

    # --- generation ------------------------------------------------------------------------------

    def draw(self) -> int:
        """Draw every missing image of every row; returns how many were drawn."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_prompts_jsonl(self.prompts, self.out / "prompts.jsonl")
        drawn = 0
        loaded: tuple[str, Any, Any] | None = None  # rows of one model (plain, weighted) share its compiled sampler
        for row in self.rows:
            todo = generation.pending_images(self.out, row, self.prompts, self.seeds, self.settings, self.subjects)
            total = len(self.prompts) * len(self.seeds)
            if not todo:
                self.log(f"{row.name}: all {total} images already drawn")
                continue
            self.log(f"{row.name}: drawing {len(todo)} of {total} images ({total - len(todo)} already there)")
            if loaded is None or loaded[0] != row.model:
                loaded = None  # the previous model leaves memory before the next loads
                loaded = (row.model, *self.load_pipeline(row.model))
            _, pipe, params = loaded
            with self._bar(len(todo), f"drawing {row.name}") as bar:
                drawn += generation.draw_row(pipe, params, self.out, row, todo, self.settings, self.subjects,
                                             self.batch_size, bar.update)
        return drawn

    # --- scoring ---------------------------------------------------------------------------------

    def image_items(self, row: Row) -> list[tuple[EvalPrompt, int, Path, str]]:
        items = []
        for prompt in self.prompts:
            for seed in self.seeds:
                path = generation.image_path(self.out, row.name, prompt.id, seed)
                if not path.is_file():
                    raise SafeJaxError(f"{path} is missing: draw the images first")
                items.append((prompt, seed, path, file_sha1(path)))
        return items

    def score(self) -> dict[str, Any]:
        """Score every row with every metric; write scores.jsonl and results.json; return results."""
        per_image: dict[tuple[str, str, int], dict[str, Any]] = {}
        results: dict[str, dict[str, Any]] = {row.name: {} for row in self.rows}
        items = {row.name: self.image_items(row) for row in self.rows}
        for row in self.rows:
            for prompt, seed, path, _ in items[row.name]:
                per_image[(row.name, prompt.id, seed)] = {
                    "model": row.name, "id": prompt.id, "seed": seed, "image": path.relative_to(self.out).as_posix()}
        for metric in self.metrics:
            metric.prepare(self.prompts)
            if isinstance(metric, SetMetric):
                self._score_set(metric, items, results)
            else:
                self._score_images(metric, items, per_image, results)
            metric.release()
        write_scores(self.out / "scores.jsonl", list(per_image.values()))
        document = {"settings": self.describe(), "results": results}
        write_json(self.out / "results.json", document)
        return document

    def _score_images(self, metric: Metric, items, per_image, results) -> None:
        cache = ScoreCache(self.out, metric.name, metric.identity)
        for row in self.rows:
            rel = lambda path: path.relative_to(self.out).as_posix()  # noqa: E731
            todo = [it for it in items[row.name] if cache.get(rel(it[2]), it[3]) is None]
            with self._bar(len(todo), f"{metric.name} {row.name}") as bar:
                for start in range(0, len(todo), metric.batch_size):
                    chunk = todo[start:start + metric.batch_size]
                    images = [_load_png(path) for _, _, path, _ in chunk]
                    values = metric.score(images, [p for p, _, _, _ in chunk])
                    cache.add((rel(path), sha1, v) for (_, _, path, sha1), v in zip(chunk, values))
                    bar.update(len(chunk))
            by_field: dict[str, dict[tuple[str, int], float]] = {}
            for prompt, seed, path, sha1 in items[row.name]:
                values = cache.get(rel(path), sha1) or {}
                per_image[(row.name, prompt.id, seed)].update(values)
                for key, value in values.items():
                    by_field.setdefault(key, {})[(prompt.id, seed)] = value
            for key in sorted(by_field):
                results[row.name][key] = statistics.summarise(by_field[key])

    def _score_set(self, metric: SetMetric, items, results) -> None:
        real = [p for p in self.prompts if p.has_image]
        if len(real) < 2:
            raise SafeJaxError(f"{metric.name} needs ground-truth images: {len(real)} of {len(self.prompts)} "
                               "prompts have an 'image'")
        real_keys = [(p.id, _bytes_sha1(p)) for p in real]
        real_id = hashlib.sha1(repr(real_keys).encode()).hexdigest()[:16]
        reference = metric.load_reference(self.out, real_id)
        if reference is None:
            real_cache = FeatureCache(self.out, metric.name, "real", metric.identity)
            missing = [(p, key) for p, key in zip(real, real_keys) if real_cache.get(*key) is None]
            with self._bar(len(missing), f"{metric.name} real images") as bar:
                for start in range(0, len(missing), metric.batch_size):
                    chunk = missing[start:start + metric.batch_size]
                    real_cache.put([k for _, k in chunk], metric.features([p.load_image() for p, _ in chunk]))
                    real_cache.save()
                    bar.update(len(chunk))
            reference = metric.reference(np.stack([real_cache.get(*k) for k in real_keys]))
            metric.save_reference(self.out, real_id, reference)
        for row in self.rows:
            cache = FeatureCache(self.out, metric.name, row.name, metric.identity)
            keys = [(path.relative_to(self.out).as_posix(), sha1) for _, _, path, sha1 in items[row.name]]
            todo = [(it, k) for it, k in zip(items[row.name], keys) if cache.get(*k) is None]
            with self._bar(len(todo), f"{metric.name} {row.name}") as bar:
                for start in range(0, len(todo), metric.batch_size):
                    chunk = todo[start:start + metric.batch_size]
                    cache.put([k for _, k in chunk], metric.features([_load_png(it[2]) for it, _ in chunk]))
                    cache.save()
                    bar.update(len(chunk))
            feats = np.stack([cache.get(*k) for k in keys])
            seeds = np.array([seed for _, seed, _, _ in items[row.name]])
            per_seed = {int(s): metric.distance(feats[seeds == s], reference) for s in self.seeds}
            results[row.name][metric.name] = statistics.summarise_set(
                per_seed, metric.distance(feats, reference), len(feats))

    def describe(self) -> dict[str, Any]:
        return {"rows": [dataclasses.asdict(r) for r in self.rows], "seeds": list(self.seeds),
                "num_prompts": len(self.prompts), "generation": dataclasses.asdict(self.settings),
                "metrics": {m.name: m.describe() for m in self.metrics}}


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _bytes_sha1(prompt: EvalPrompt) -> str:
    if prompt.image_bytes is not None:
        return hashlib.sha1(prompt.image_bytes).hexdigest()
    return file_sha1(prompt.image_path)


def read_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))
