"""The evaluation's metrics: each loads a local checkpoint and scores uint8 images with our Flax models.

Per-image metrics (``score`` → one dict of fields per image):
    clipscore       100 · cos(image, caption) per image, as torchmetrics computes it (--clip)
    pickscore       exp(logit_scale) · cos, PickScore_v1                            (--pickscore)
    hps             cos of HPS v2 / v2.1 (open_clip ViT-H-14) features              (--hps)
    imagereward     ImageReward's normalised BLIP reward                            (--imagereward)
    subject_recall  our subject grounding: recall@1 and MRR per subject, per kind   (--clip)
    world_recall    the synthetic world's ground truth: the share of a caption's subjects its
                    detector finds in the picture, overall and per kind (no model: the world's
                    own drawing rules, ``tfds_anchor.anchor.world_detect``; for anchor/sample)
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
    "world_recall": None,  # no checkpoint: the world's detector
}
SET_METRICS = ("fid_clip", "cmmd")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_metrics(checkpoints: Mapping[str, Path | None]) -> list[str]:
    names = [name for name, key in METRICS.items() if key is not None and checkpoints.get(key) is not None]
    if not names:
        raise SafeJaxError("no metric to compute: give a metric model (--clip, --fid-clip, --pickscore, --hps, "
                           "--imagereward, --cmmd-clip) and optionally --metrics")
    return names


def check_checkpoints(names: Sequence[str], checkpoints: Mapping[str, Path | None]) -> None:
    """Every asked metric has its checkpoint, of the right kind: one line naming the flag if not."""
    for name in names:
        key = METRICS[name]
        if key is None:
            continue
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
        if name in ("subject_recall", "world_recall") and not any(p.subjects for p in prompts):
            raise SafeJaxError(f"metric {name} needs subjects: none of the prompts has any "
                               "(give 'subjects' in the prompts or use --subjects auto)")
        if name == "world_recall":
            try:
                from tfds_anchor.anchor.world_vocab import signature_of
            except ImportError:
                raise SafeJaxError("metric world_recall needs the tfds_anchor package (pip install safe-jax[data])") from None
            if not any(signature_of(s.text) for p in prompts for s in p.subjects or ()):
                raise SafeJaxError("metric world_recall judges the synthetic world's subjects (anchor/sample), and "
                                   "no prompt names one")


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


def _load_features(cls, folder: Path, batch_size: int, flag: str):
    try:
        return cls.from_folder(folder, batch_size)
    except SafeJaxError as e:
        raise SafeJaxError(f"{flag} {folder}: {e}") from None


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

    def load_reference(self, out: Path, real_id: str) -> Any | None:
        """A reference of the same real images (``real_id``) and model saved by an earlier run."""
        return None

    def save_reference(self, out: Path, real_id: str, reference: Any) -> None:
        pass

    def distance(self, features: np.ndarray, reference: Any) -> float:
        raise NotImplementedError


class _CLIPMetric(Metric):
    """A metric computed with a transformers CLIPModel folder (``clip_scores.CLIPFeatures``)."""

    def prepare(self, prompts):
        from safe_jax.eval.clip_scores import CLIPFeatures
        from safe_jax.train.rewards import clip_tokenizer

        try:
            self.clip = CLIPFeatures.from_folder(self.checkpoint, self.batch_size)
            self.tokenizer = clip_tokenizer(self.checkpoint)
        except SafeJaxError as e:
            raise SafeJaxError(f"{_flag(METRICS[self.name])} {self.checkpoint}: {e}") from None
        self._texts: dict[str, np.ndarray] = {}

    def release(self):
        self.clip = self.tokenizer = None

    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, computed once per distinct text (subject prompts repeat)."""
        from safe_jax.text.tokenizer import tokenize

        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if new:
            ids = tokenize(self.tokenizer, new, self.clip.model.config.text.max_position_embeddings)
            self._texts.update(zip(new, self.clip.text_embeds(ids)))
        return np.stack([self._texts[t] for t in texts])

    def processor_embeds(self, images) -> np.ndarray:
        from safe_jax.eval.clip_scores import clip_processor_pixels

        size = self.clip.image_size
        return self.clip.image_embeds(np.stack([clip_processor_pixels(im, size) for im in images]))


class CLIPScore(_CLIPMetric):
    """torchmetrics' CLIPScore: per image 100 · cos (its per-sample score; the metric's value is the
    mean, clamped at 0); pixels and token ids exactly as torchmetrics feeds the CLIP processor."""

    name = "clipscore"

    def score(self, images, prompts):
        from safe_jax.eval.clip_scores import clipscore_per_image, torchmetrics_input_ids

        ids = torchmetrics_input_ids(self.tokenizer, [p.caption for p in prompts],
                                     self.clip.model.config.text.max_position_embeddings)
        values = clipscore_per_image(self.processor_embeds(images), self.clip.text_embeds(ids))
        return [{"clipscore": float(v)} for v in np.asarray(values)]


class PickScore(_CLIPMetric):
    name = "pickscore"

    def score(self, images, prompts):
        from safe_jax.eval.clip_scores import cosine

        cos = np.asarray(cosine(self.processor_embeds(images), self.text_embeds([p.caption for p in prompts])))
        scale = float(np.exp(np.float32(self.clip.logit_scale)))
        return [{"pickscore": float(scale * c)} for c in cos]


class SubjectRecall(_CLIPMetric):
    name = "subject_recall"

    def __init__(self, checkpoint, batch_size=16, distractors: int = 9):
        super().__init__(checkpoint, batch_size)
        self.distractors = distractors
        self.identity += f":distractors={distractors}"

    def prepare(self, prompts):
        import hashlib

        from safe_jax.eval.subject_recall import candidate_sets

        super().prepare(prompts)
        self.sets = candidate_sets(prompts, self.distractors)
        # The candidates depend on every prompt's subjects: another prompt set, other scores.
        digest = hashlib.sha1(repr(sorted((k, [c.texts for c in v]) for k, v in self.sets.items())).encode())
        self.identity = self.identity.split("|sets=")[0] + f"|sets={digest.hexdigest()[:16]}"

    def describe(self):
        return {**super().describe(), "distractors": self.distractors, "template": "a photo of {}"}

    def score(self, images, prompts):
        from safe_jax.eval.subject_recall import TEMPLATE, recall_scores

        image = self.processor_embeds(images)
        texts = lambda subjects: self.text_embeds([TEMPLATE.format(s) for s in subjects])  # noqa: E731
        return [recall_scores(e, self.sets.get(p.id, []), texts) for e, p in zip(image, prompts)]


class WorldRecall(Metric):
    """Ground-truth subject recall on the synthetic world: per picture, the share of its caption's
    subjects that the world's own detector finds (a score of at least ``world_detect.THRESHOLD``).
    Subjects the world never draws ("reporters") are not judged. It needs no learned model, so it
    cannot be gamed by optimising against one; it is only meaningful for pictures of the world."""

    name = "world_recall"

    def __init__(self, checkpoint=None, batch_size: int = 16):
        import hashlib
        import inspect

        from tfds_anchor.anchor import world_detect, world_vocab

        self.checkpoint, self.batch_size = None, batch_size
        # The detector's own code is its checkpoint: another detector, other cached scores.
        code = inspect.getsource(world_detect) + inspect.getsource(world_vocab)
        self.identity = f"{self.name}:v1:{hashlib.sha1(code.encode()).hexdigest()[:16]}"

    def describe(self):
        from tfds_anchor.anchor import world_detect

        return {"model": "tfds_anchor.anchor.world_detect", "threshold": world_detect.THRESHOLD}

    def score(self, images, prompts):
        from tfds_anchor.anchor import world_detect
        from tfds_anchor.anchor.world_vocab import kind_of, signature_of

        out = []
        for image, prompt in zip(images, prompts):
            detection = world_detect.detect(image)
            hits: dict[str, list[float]] = {}
            for subject in prompt.subjects or ():
                signature = signature_of(subject.text)
                if signature is None:
                    continue
                hit = float(detection["signatures"][signature] >= world_detect.THRESHOLD)
                hits.setdefault("world_recall", []).append(hit)
                hits.setdefault(f"world_recall.{kind_of(signature)}", []).append(hit)
            out.append({key: float(np.mean(v)) for key, v in hits.items()})
        return out


class FIDCLIP(SetMetric):
    """clean-fid's ``clip_vit_b_32`` mode: unnormalised ViT-B/32 image features, Fréchet distance."""

    name = "fid_clip"

    def prepare(self, prompts):
        from safe_jax.eval.clip_scores import CLIPFeatures

        self.clip = _load_features(CLIPFeatures, self.checkpoint, self.batch_size, "--fid-clip")

    def release(self):
        self.clip = None

    def features(self, images):
        from safe_jax.eval.clip_scores import fid_clip_pixels

        return self.clip.image_features(np.stack([fid_clip_pixels(im, self.clip.image_size) for im in images]))

    def reference(self, real_features):
        from safe_jax.eval.frechet import FeatureStats

        return FeatureStats.from_features(real_features)

    def distance(self, features, reference):
        from safe_jax.eval.frechet import FeatureStats, frechet_distance

        return float(frechet_distance(FeatureStats.from_features(features), reference))

    def _reference_meta(self, real_id: str) -> dict[str, Any]:
        from safe_jax.eval.frechet import model_key

        return {"model": model_key(self.checkpoint), "preprocessing": "clean-fid clip_vit_b_32", "images": real_id}

    def load_reference(self, out, real_id):
        """``reference_stats/fid_clip.npz``: the real images' mu and sigma (float64), kept for reuse."""
        from safe_jax.eval.frechet import load_stats

        path = out / "reference_stats" / "fid_clip.npz"
        if not path.is_file():
            return None
        try:
            return load_stats(path, self._reference_meta(real_id))[0]
        except SafeJaxError:
            return None  # other images or another model: recomputed and replaced

    def save_reference(self, out, real_id, reference):
        from safe_jax.eval.frechet import save_stats

        save_stats(out / "reference_stats" / "fid_clip.npz", reference, self._reference_meta(real_id))


class CMMD(SetMetric):
    """CMMD: MMD with an RBF kernel (σ = 10, ×1000) on normalised CLIP ViT-L/14@336 embeddings."""

    name = "cmmd"

    def prepare(self, prompts):
        from safe_jax.eval.clip_scores import CLIPFeatures

        self.clip = _load_features(CLIPFeatures, self.checkpoint, self.batch_size, "--cmmd-clip")

    def release(self):
        self.clip = None

    def features(self, images):
        from safe_jax.eval import cmmd

        return self.clip.image_embeds(cmmd.preprocess(list(images), self.clip.image_size))

    def distance(self, features, reference):
        from safe_jax.eval import cmmd

        return float(cmmd.mmd(features, reference))


class HPS(Metric):
    name = "hps"

    def __init__(self, checkpoint, batch_size=16, arch: str = "ViT-H-14"):
        super().__init__(checkpoint, batch_size)
        self.arch = arch
        self.identity += f":arch={arch}"

    def describe(self):
        return {**super().describe(), "arch": self.arch}

    def prepare(self, prompts):
        from safe_jax.eval import hps

        try:
            self.model, self.params = hps.load_hps(self.checkpoint, self.arch)
        except SafeJaxError as e:
            raise SafeJaxError(f"--hps {self.checkpoint}: {e}") from None
        self._score = jax.jit(lambda p, x, ids: hps.hps_score(self.model, p, x, ids))

    def release(self):
        self.model = self.params = None

    def score(self, images, prompts):
        from safe_jax.eval import hps

        pixels = hps.preprocess(list(images), self.model.config.vision.image_size)
        ids = np.asarray(hps.tokenize([p.caption for p in prompts]))
        n = len(images)
        out = self._score(self.params, _padded(pixels, self.batch_size), _padded(ids, self.batch_size))
        return [{"hps": float(v)} for v in np.asarray(out)[:n]]


class ImageReward(Metric):
    name = "imagereward"

    def __init__(self, checkpoint, batch_size=16, vision: str = "large"):
        super().__init__(checkpoint, batch_size)
        self.vision = vision
        self.identity += f":vision={vision}"

    def describe(self):
        return {**super().describe(), "vision": self.vision}

    def prepare(self, prompts):
        from safe_jax.io.image_reward import load_image_reward

        try:
            self.model, self.params, self.tokenizer = load_image_reward(self.checkpoint, vision=self.vision)
        except SafeJaxError as e:
            raise SafeJaxError(f"--imagereward {self.checkpoint}: {e}") from None

    def release(self):
        self.model = self.params = self.tokenizer = None

    def score(self, images, prompts):
        from safe_jax.io import image_reward

        n, pad = len(images), self.batch_size - len(images)
        captions = [p.caption for p in prompts]
        values = image_reward.score(self.model, self.params, self.tokenizer, list(images) + [images[-1]] * pad,
                                    captions + [captions[-1]] * pad)
        return [{"imagereward": float(v)} for v in values[:n]]


_CLASSES = {"fid_clip": FIDCLIP, "clipscore": CLIPScore, "pickscore": PickScore, "hps": HPS,
            "imagereward": ImageReward, "cmmd": CMMD, "subject_recall": SubjectRecall, "world_recall": WorldRecall}


def make_metric(name: str, checkpoints: Mapping[str, Path | None], *, batch_size: int = 16,
                distractors: int = 9, hps_arch: str = "ViT-H-14", imagereward_vision: str = "large") -> Metric:
    cls = _CLASSES[name]
    if METRICS[name] is None:
        return cls(None, batch_size)
    path = checkpoints[METRICS[name]]
    extra = {SubjectRecall: (distractors,), HPS: (hps_arch,), ImageReward: (imagereward_vision,)}.get(cls, ())
    return cls(path, batch_size, *extra)

