"""Summaries a results table can be trusted on: the mean, its spread over seeds, and a 95% interval.

Images of one caption under different seeds are not independent samples of the model's quality:
the caption dominates. So the bootstrap resamples captions (with all their seeds), not images, and
"std over seeds" is the spread of the per-seed means, the number a reader compares a difference
between two models with.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

BOOTSTRAP_SAMPLES = 1000


def summarise(values: Mapping[tuple[str, int], float], *, samples: int = BOOTSTRAP_SAMPLES,
              seed: int = 0) -> dict:
    """``values`` maps (prompt id, seed) to a score; NaNs (no score for that image) are left out.

    Returns mean, std over seeds (sample std of the per-seed means; 0 with one seed), n (images),
    per_seed means and ci95, the 2.5/97.5 percentiles of the mean over ``samples`` resamplings of
    the prompts with replacement.
    """
    items = [(pid, s, float(v)) for (pid, s), v in values.items() if v is not None and np.isfinite(v)]
    if not items:
        return {"mean": None, "std": None, "n": 0, "per_seed": {}, "ci95": None}
    scores = np.array([v for _, _, v in items])
    seeds = sorted({s for _, s, _ in items})
    per_seed = {str(s): float(np.mean([v for _, t, v in items if t == s])) for s in seeds}
    std = float(np.std(list(per_seed.values()), ddof=1)) if len(seeds) > 1 else 0.0
    ids = sorted({pid for pid, _, _ in items})
    index = {pid: i for i, pid in enumerate(ids)}
    sums = np.zeros(len(ids))
    counts = np.zeros(len(ids))
    for pid, _, v in items:
        sums[index[pid]] += v
        counts[index[pid]] += 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(samples, len(ids)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(scores.mean()), "std": std, "n": len(items), "per_seed": per_seed,
            "ci95": [float(low), float(high)]}


def summarise_set(per_seed: Mapping[int, float], pooled: float, n: int) -> dict:
    """A set-level metric (FID_CLIP, CMMD): the value on all images pooled, and per seed with its std."""
    values = [float(v) for v in per_seed.values()]
    return {"value": float(pooled), "n": n, "per_seed": {str(k): float(v) for k, v in per_seed.items()},
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
