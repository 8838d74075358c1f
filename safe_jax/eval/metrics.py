"""The evaluation's metrics: each loads a local checkpoint and scores uint8 images with our Flax models.

Per-image metrics (``score`` → one dict of fields per image):
    clipscore       100 · max(cos(image, caption), 0), as torchmetrics reports it   (--clip)
    pickscore       exp(logit_scale) · cos, PickScore_v1                            (--pickscore)
    hps             cos of HPS v2 / v2.1 (open_clip ViT-H-14) features              (--hps)
    imagereward     ImageReward's normalised BLIP reward                            (--imagereward)
    subject_recall  our subject grounding: recall@1 and MRR per subject, per kind   (--clip)
Set metrics (``features`` per image, ``distance`` between generated and real sets):
    fid_clip        clean-fid's clip_vit_b_32: Fréchet distance of CLIP ViT-B/32 features (--fid-clip)
    cmmd            MMD (RBF, σ = 10, ×1000) of CLIP ViT-L/14@336 embeddings            (--cmmd-clip)

A metric's ``identity`` names its checkpoint (path, sizes and times of its files) and settings;
cached scores of another identity are never reused. Models load in ``prepare`` and are dropped in
``release``, so only one metric model is in memory at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.eval import preprocess as pre
from safe_jax.eval.prompts import EvalPrompt

# metric → the flag naming its checkpoint (the key of the checkpoints mapping)
METRICS: dict[str, str] = {
    "fid_clip": "fid_clip",
    "clipscore": "clip",
    "pickscore": "pickscore",
    "hps": "hps",
    "imagereward": "imagereward",
    "cmmd": "cmmd_clip",
    "subject_recall": "clip",
}
SET_METRICS = ("fid_clip", "cmmd")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_metrics(checkpoints: Mapping[str, Path | None]) -> list[str]:
    names = [name for name, key in METRICS.items() if checkpoints.get(key) is not None]
    if not names:
        raise SafeJaxError("no metric to compute: give a metric model (--clip, --fid-clip, --pickscore, --hps, "
                           "--imagereward, --cmmd-clip) and optionally --metrics")
    return names


def check_checkpoints(names: Sequence[str], checkpoints: Mapping[str, Path | None]) -> None:
    """Every asked metric has its checkpoint, of the right kind: one line naming the flag if not."""
    for name in names:
        key = METRICS[name]
        path = checkpoints.get(key)
        flag = _flag(key)
        if path is None:
            raise SafeJaxError(f"metric {name} needs {flag} (a local checkpoint; nothing is downloaded)")
        if key in ("clip", "fid_clip", "pickscore", "cmmd_clip"):
            if not path.is_dir():
                raise SafeJaxError(f"{flag} {path}: not a folder (expected a transformers CLIPModel folder)")
            if not (path / "config.json").is_file():
                raise SafeJaxError(f"{flag} {path}: no config.json (expected a transformers CLIPModel folder)")
        else:
            if not path.is_file():
                raise SafeJaxError(f"{flag} {path}: no such file")
            if key == "imagereward":
                config = path.parent / "med_config.json"
                if not config.is_file():
                    raise SafeJaxError(f"{flag} {path}: no med_config.json beside it")


def check_prompts(names: Sequence[str], prompts: Sequence[EvalPrompt]) -> None:
    for name in names:
        if name in SET_METRICS:
            real = sum(p.has_image for p in prompts)
            if real < 2:
                raise SafeJaxError(f"metric {name} compares with real images: {real} of {len(prompts)} prompts have "
                                   "an 'image' (a TFDS split has them; a JSONL line needs \"image\")")
        if name == "subject_recall" and not any(p.subjects for p in prompts):
            raise SafeJaxError("metric subject_recall needs subjects: none of the prompts has any "
                               "(give 'subjects' in the prompts or use --subjects auto)")


def fingerprint(path: Path) -> str:
    """Path, size and modification time of a checkpoint file, or of every file in a folder."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [str(path.resolve())]
    for f in files:
        info = f.stat()
        parts.append(f"{f.name}:{info.st_size}:{int(info.st_mtime)}")
    return "|".join(parts)


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    """Pad a batch to ``size`` rows by repeating the last, so one compiled function serves all."""
    if len(batch) == size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


class Metric:
    name: str = ""
    batch_size: int = 16

    def __init__(self, checkpoint: Path, batch_size: int = 16):
        self.checkpoint = Path(checkpoint)
        self.batch_size = batch_size
        self.identity = f"{self.name}:v1:{fingerprint(self.checkpoint)}"

    def prepare(self, prompts: Sequence[EvalPrompt]) -> None:
        pass

    def release(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"model": str(self.checkpoint)}

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[EvalPrompt]) -> list[dict[str, float]]:
        raise NotImplementedError


class SetMetric(Metric):
    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def reference(self, real_features: np.ndarray) -> Any:
        return real_features

    def distance(self, features: np.ndarray, reference: Any) -> float:
        raise NotImplementedError


class CLIPEmbedder:
    """A transformers CLIPModel folder in our Flax CLIP: jitted, fixed-batch image and text embeddings."""

    def __init__(self, folder: Path, batch_size: int):
        from safe_jax.io.clip_folder import load_clip
        from safe_jax.train.rewards import clip_tokenizer

        try:
            self.model, self.params = load_clip(folder)
            self.tokenizer = clip_tokenizer(folder)
        except SafeJaxError as e:
            raise SafeJaxError(f"CLIP folder {folder}: {e}") from None
        self.batch_size = batch_size
        self.image_size = self.model.config.vision.image_size
        self.logit_scale = float(np.exp(np.asarray(self.params["logit_scale"], np.float32)))
        self._image = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="get_image_features"))
        self._text = jax.jit(lambda p, ids: self.model.apply({"params": p}, ids, method="get_text_features"))
        self._texts: dict[str, np.ndarray] = {}

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """Projected, un-normalised features of preprocessed [N, S, S, 3] float32 pixels."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start:start + self.batch_size]
            out.append(np.asarray(self._image(self.params, _padded(chunk, self.batch_size)))[:len(chunk)])
        return np.concatenate(out).astype(np.float32)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Projected, un-normalised text features, cached per text (distractors repeat)."""
        from safe_jax.text.tokenizer import tokenize

        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            ids = np.asarray(tokenize(self.tokenizer, chunk, self.model.config.text.max_position_embeddings))
            feats = np.asarray(self._text(self.params, _padded(ids, self.batch_size)))[:len(chunk)]
            self._texts.update(zip(chunk, feats.astype(np.float32)))
        return np.stack([self._texts[t] for t in texts])

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """CLIP's processor / clean-fid: shorter side to the model's size (PIL bicubic), centre crop."""
        return pre.normalise(np.stack([pre.resize_shorter_crop(im, self.image_size) for im in images]))


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _CLIPMetric(Metric):
    def prepare(self, prompts):
        self.clip = CLIPEmbedder(self.checkpoint, self.batch_size)

    def release(self):
        self.clip = None

    def cosines(self, images, prompts) -> np.ndarray:
        image = _normalised(self.clip.image_features(self.clip.preprocess(images)))
        text = _normalised(self.clip.text_features([p.caption for p in prompts]))
        return np.sum(image * text, axis=-1)


class CLIPScore(_CLIPMetric):
    name = "clipscore"

    def score(self, images, prompts):
        return [{"clipscore": float(100.0 * max(c, 0.0))} for c in self.cosines(images, prompts)]


class PickScore(_CLIPMetric):
    name = "pickscore"

    def score(self, images, prompts):
        return [{"pickscore": float(self.clip.logit_scale * c)} for c in self.cosines(images, prompts)]


class SubjectRecall(_CLIPMetric):
    name = "subject_recall"

    def __init__(self, checkpoint, batch_size=16, distractors: int = 9):
        super().__init__(checkpoint, batch_size)
        self.distractors = distractors
        self.identity += f":distractors={distractors}"

    def prepare(self, prompts):
        from safe_jax.eval.subject_recall import candidate_sets

        super().prepare(prompts)
        self.sets = candidate_sets(prompts, self.distractors)
        # The candidate sets depend on every prompt's subjects: another prompt set, other scores.
        import hashlib

        digest = hashlib.sha1(repr(sorted((k, [c.texts for c in v]) for k, v in self.sets.items())).encode())
        self.identity = self.identity.split("|sets=")[0] + f"|sets={digest.hexdigest()[:16]}"

    def describe(self):
        return {**super().describe(), "distractors": self.distractors, "template": "a photo of {}"}

    def score(self, images, prompts):
        from safe_jax.eval.subject_recall import TEMPLATE, recall_scores

        image = _normalised(self.clip.image_features(self.clip.preprocess(images)))
        texts = lambda subjects: _normalised(self.clip.text_features([TEMPLATE.format(s) for s in subjects]))  # noqa: E731
        return [recall_scores(e, self.sets.get(p.id, []), texts) for e, p in zip(image, prompts)]


class FIDCLIP(SetMetric):
    """clean-fid's ``clip_vit_b_32`` mode: unnormalised ViT-B/32 image features, Fréchet distance."""

    name = "fid_clip"

    def prepare(self, prompts):
        self.clip = CLIPEmbedder(self.checkpoint, self.batch_size)

    def release(self):
        self.clip = None

    def features(self, images):
        return self.clip.image_features(self.clip.preprocess(images))

    def reference(self, real_features):
        from safe_jax.eval.frechet import FeatureStats

        return FeatureStats.from_features(real_features)

    def distance(self, features, reference):
        from safe_jax.eval.frechet import FeatureStats, frechet_distance

        return float(frechet_distance(FeatureStats.from_features(features), reference))


class CMMD(SetMetric):
    """CMMD: MMD with an RBF kernel (σ = 10, ×1000) on normalised CLIP ViT-L/14@336 embeddings."""

    name = "cmmd"

    def prepare(self, prompts):
        self.clip = CLIPEmbedder(self.checkpoint, self.batch_size)

    def release(self):
        self.clip = None

    def features(self, images):
        from safe_jax.eval import cmmd

        return _normalised(self.clip.image_features(cmmd.preprocess(images, self.clip.image_size)))

    def distance(self, features, reference):
        from safe_jax.eval import cmmd

        return float(cmmd.mmd(features, reference))


class HPS(Metric):
    name = "hps"

    def prepare(self, prompts):
        from safe_jax.eval import hps

        self.model, self.params = hps.load_hps(self.checkpoint)
        self._score = jax.jit(lambda p, x, ids: hps.hps_score(self.model, p, x, ids))

    def release(self):
        self.model = self.params = None

    def score(self, images, prompts):
        from safe_jax.eval import hps

        pixels = hps.preprocess(list(images))
        ids = np.asarray(hps.tokenize([p.caption for p in prompts]))
        n = len(images)
        out = self._score(self.params, _padded(pixels, self.batch_size), _padded(ids, self.batch_size))
        return [{"hps": float(v)} for v in np.asarray(out)[:n]]


class ImageReward(Metric):
    name = "imagereward"

    def prepare(self, prompts):
        from safe_jax.io.image_reward import load_image_reward

        self.model, self.params, self.tokenizer = load_image_reward(self.checkpoint)
        self._score = jax.jit(lambda p, x, ids, mask: self.model.apply({"params": p}, x, ids, mask))

    def release(self):
        self.model = self.params = self.tokenizer = None

    def score(self, images, prompts):
        from safe_jax.io import image_reward

        pixels = image_reward.preprocess_images(list(images))
        ids, mask = image_reward.tokenize(self.tokenizer, [p.caption for p in prompts])
        n = len(images)
        out = self._score(self.params, _padded(pixels, self.batch_size), _padded(np.asarray(ids), self.batch_size),
                          _padded(np.asarray(mask), self.batch_size))
        return [{"imagereward": float(v)} for v in np.asarray(out)[:n]]


_CLASSES = {"fid_clip": FIDCLIP, "clipscore": CLIPScore, "pickscore": PickScore, "hps": HPS,
            "imagereward": ImageReward, "cmmd": CMMD, "subject_recall": SubjectRecall}


def make_metric(name: str, checkpoints: Mapping[str, Path | None], *, batch_size: int = 16,
                distractors: int = 9) -> Metric:
    cls = _CLASSES[name]
    path = checkpoints[METRICS[name]]
    if cls is SubjectRecall:
        return cls(path, batch_size, distractors)
    return cls(path, batch_size)

