"""Fréchet distance between feature sets (FID, FID_CLIP) as clean-fid computes it, and the
``.npz`` cache of a reference set's statistics.

Published FID numbers depend on the exact estimator, so ``FeatureStats.from_features`` and
``frechet_distance`` follow clean-fid 0.1.35 (``cleanfid/fid.py``) step by step:

- mean ``np.mean(features, axis=0)`` (in the features' dtype, so float32 features give a float32
  mean, kept here as float64), covariance ``np.cov(features, rowvar=False)`` (float64, n − 1);
- ``d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr sqrtm(Σ₁Σ₂)`` with ``scipy.linalg.sqrtm``; when that
  square root is not finite (a singular product), both covariances get ``eps = 1e-6`` on the
  diagonal and it is taken again; a complex result keeps its real part when every imaginary part
  on the diagonal is within 1e-3 of zero, otherwise it is an error.

A reference cache stores, beside the statistics, what produced them (the feature model, the
preprocessing, the number of images): a cache made with other weights or another resize gives a
plausible but wrong FID, so ``load_stats`` refuses one whose key differs from the caller's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import linalg

from safe_jax.errors import SafeJaxError
from safe_jax.io import atomic

log = logging.getLogger(__name__)

EPS = 1e-6
IMAGINARY_ATOL = 1e-3
_FORMAT = "safe_jax.frechet_stats/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz", ".msgpack")


@dataclass(frozen=True)
class FeatureStats:
    """Mean [D] and covariance [D, D] (float64) of ``n`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: Any) -> "FeatureStats":
        """clean-fid's mean and covariance of [n, D] features (n ≥ 2: the covariance divides by n − 1)."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] < 2:
            raise SafeJaxError(f"Fréchet statistics need [n ≥ 2, D] features, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise SafeJaxError("Fréchet statistics: the features hold NaN or infinity")
        mu = np.mean(features, axis=0).astype(np.float64)
        sigma = np.atleast_2d(np.cov(features, rowvar=False)).astype(np.float64)
        return cls(mu=mu, sigma=sigma, n=int(features.shape[0]))


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = EPS) -> float:
    """Squared Fréchet distance between the Gaussians fitted to two feature sets (clean-fid's)."""
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    sigma1, sigma2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SafeJaxError(f"Fréchet distance between features of different widths: "
                           f"{mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "singular" is routine for n < D; the finiteness check decides
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            log.warning("Fréchet distance: singular covariance product; adding %s to the diagonals", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise SafeJaxError(f"Fréchet distance: the covariance product's square root has an imaginary "
                               f"component of {np.max(np.abs(covmean.imag)):g} (not covariances of real features?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def model_key(folder: str | os.PathLike) -> str:
    """A short identity of a model folder: a hash of its weight files' names and sizes plus
    config.json's bytes (cheap to recompute, changes when the checkpoint does)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SafeJaxError(f"model folder {folder} does not exist")
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\n".encode())
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return h.hexdigest()[:16]


def _meta(meta: Mapping[str, Any], stats: FeatureStats) -> dict[str, Any]:
    meta = dict(meta)
    if meta.setdefault("num_images", stats.n) != stats.n:
        raise SafeJaxError(f"stats cache: meta says {meta['num_images']} images, the statistics {stats.n}")
    for key, value in meta.items():
        if not isinstance(value, (str, int, float, bool)) or isinstance(value, float) and not np.isfinite(value):
            raise SafeJaxError(f"stats cache: meta {key!r} must be a string or a number, got {value!r}")
    return meta


def save_stats(path: str | os.PathLike, stats: FeatureStats, meta: Mapping[str, Any]) -> Path:
    """Write ``stats`` and ``meta`` (e.g. ``model``, ``preprocessing``; ``num_images`` is added)
    to ``path`` (.npz), atomically: a reader never sees a half-written cache."""
    path = Path(path)
    meta = _meta(meta, stats)
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
                 n=np.int64(stats.n), meta=np.array(json.dumps({"format": _FORMAT, **meta}, sort_keys=True)))
    return path


def load_stats(path: str | os.PathLike, expect: Mapping[str, Any] | None = None
               ) -> tuple[FeatureStats, dict[str, Any]]:
    """(stats, meta) from a ``save_stats`` file; an error when any key of ``expect`` differs."""
    path = Path(path)
    if not path.is_file():
        raise SafeJaxError(f"stats cache {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = FeatureStats(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                                 n=int(data["n"]))
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise SafeJaxError(f"stats cache {path} is not readable ({type(e).__name__}: {e})") from e
    if meta.pop("format", None) != _FORMAT:
        raise SafeJaxError(f"stats cache {path} is not a {_FORMAT} file")
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    if stats.sigma.shape != (d, d):
        raise SafeJaxError(f"stats cache {path}: mean {stats.mu.shape} and covariance {stats.sigma.shape} disagree")
    differ = [f"{key} {meta.get(key)!r} (wanted {value!r})"
              for key, value in (expect or {}).items() if meta.get(key) != value]
    if differ:
        raise SafeJaxError(f"stats cache {path} was made differently: {'; '.join(differ)}; delete it to recompute")
    return stats, meta
