"""Drawing the evaluation's images: ``images/<row>/<id>_<seed>.png``, resumable and checked.

An evaluation is hours of sampling; scores are minutes. So every image is written as soon as it is
made (to a temporary name, then renamed, so a kill never leaves half a PNG under the final name),
and a re-run draws only what is missing. The settings that made an image live in its PNG text; a
re-run with other settings (steps, guidance, sampler, subjects, weight, size) refuses to mix its
images with the old ones rather than silently average two experiments.

Image ``<id>_<seed>`` starts from seed ``seed`` alone (``StableDiffusion.generate`` gives every
image its own key), so it is the same picture whatever the batch size or device count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.eval.prompts import EvalPrompt
from safe_jax.io import atomic

SUBJECT_MODES = ("none", "stored", "auto")


@dataclass(frozen=True)
class Row:
    """One line of the results table: a model drawn in one subject mode."""

    name: str    # the folder under images/ and the key in scores/results
    model: str   # a diffusers folder or a preset name
    subjects: str = "none"  # none: plain captions; stored / auto: subject tokens weighted

    @property
    def weighted(self) -> bool:
        return self.subjects != "none"


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 100
    guidance: float = 7.5
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    subject_weight: float = 1.21
    weighting: str = "compel"
    subject_format: str = "plain"
    negative_prompt: str = ""
    dtype: str = "default"


def image_path(out: Path, row: str, prompt_id: str, seed: int) -> Path:
    return out / "images" / row / f"{prompt_id}_{seed}.png"


def image_settings(row: Row, settings: GenerationSettings, prompt: EvalPrompt, seed: int,
                   subjects: Sequence[str] | None) -> dict[str, Any]:
    """What defines an image: written into its PNG, compared on resume."""
    record = {"row": row.name, "model": row.model, "id": prompt.id, "prompt": prompt.caption, "seed": seed,
              **asdict(settings), "subjects": list(subjects) if row.weighted and subjects is not None else None}
    if not row.weighted:
        for key in ("subject_weight", "weighting", "subject_format"):
            record.pop(key)
    return record


def read_png_settings(path: Path) -> dict[str, Any] | None:
    """The settings stored in one of our PNGs (None when it holds none)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get("parameters") if hasattr(image, "text") else None
    except (OSError, ValueError):
        return None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


_COMPARED = ("prompt", "seed", "steps", "guidance", "scheduler", "subjects", "subject_weight", "weighting",
             "subject_format", "negative_prompt", "dtype")


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within 1e-9 relative: 1.1² (1.2100000000000002) and ``--subject-weight 1.21``
    draw the same image, so neither may refuse the other's images."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    for key in _COMPARED:
        if not _same(found.get(key), wanted.get(key)):
            return f"{key}={found.get(key)!r}, this run asks {wanted.get(key)!r}"
    for key in ("height", "width"):
        if wanted.get(key) is not None and found.get(key) != wanted.get(key):
            return f"{key}={found.get(key)!r}, this run asks {wanted.get(key)!r}"
    return None


def pending_images(out: Path, row: Row, prompts: Sequence[EvalPrompt], seeds: Sequence[int],
                   settings: GenerationSettings, subjects: Callable[[EvalPrompt], list[str] | None]
                   ) -> list[tuple[EvalPrompt, int]]:
    """The (prompt, seed) pairs of ``row`` still to draw; existing images are checked, not redrawn.

    Leftover temporary files of a killed run are removed. An existing image made with other
    settings is an error naming it and the first differing setting.
    """
    folder = out / "images" / row.name
    if folder.is_dir():
        for stale in atomic.leftovers(folder):
            stale.unlink()
    todo = []
    for prompt in prompts:
        for seed in seeds:
            path = image_path(out, row.name, prompt.id, seed)
            if not path.exists():
                todo.append((prompt, seed))
                continue
            found = read_png_settings(path)
            wanted = image_settings(row, settings, prompt, seed, subjects(prompt))
            if found is None:
                raise SafeJaxError(f"{path} exists but holds no safe-jax settings (not an image of this "
                                   "evaluation): move it away or use another --out")
            diff = _mismatch(found, wanted)
            if diff:
                raise SafeJaxError(f"{path} was drawn with {diff}: use another --out, or delete "
                                   f"{out / 'images' / row.name} to redraw")
    return todo


def save_png(path: Path, image: np.ndarray, settings: dict[str, Any]) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(settings, ensure_ascii=False))
    info.add_text("Software", "safe-jax")
    with atomic.replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def draw_row(pipe: Any, params: Any, out: Path, row: Row, todo: Sequence[tuple[EvalPrompt, int]],
             settings: GenerationSettings, subjects: Callable[[EvalPrompt], list[str] | None],
             batch_size: int, progress: Callable[[int], None] = lambda n: None) -> int:
    """Draw ``todo`` with ``pipe`` in batches of ``batch_size`` and write each PNG at once.

    The last batch is padded with copies of its last item, so one compiled sampler serves every
    batch; the copies are discarded.
    """
    written = 0
    for start in range(0, len(todo), batch_size):
        chunk = list(todo[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        chunk_subjects = [subjects(p) or [] for p, _ in padded] if row.weighted else None
        images = pipe.generate(
            params, [p.caption for p, _ in padded], negative_prompts=settings.negative_prompt,
            num_steps=settings.steps, guidance_scale=settings.guidance, scheduler=settings.scheduler,
            seeds=[seed for _, seed in padded], height=settings.height, width=settings.width,
            subjects=chunk_subjects, subject_weight=settings.subject_weight, weighting=settings.weighting,
            subject_format=settings.subject_format)
        for (prompt, seed), image in zip(chunk, images):
            record = image_settings(row, settings, prompt, seed, subjects(prompt))
            record.update(height=int(image.shape[0]), width=int(image.shape[1]))
            save_png(image_path(out, row.name, prompt.id, seed), np.asarray(image), record)
            written += 1
        progress(len(chunk))
    return written
