"""How well the world's detector judges pictures, and how fast the world draws them.

A judge is only worth its verdicts if it finds what is there on pictures that look like a tiny
diffusion model's (blurred, noisy, colour-shifted, a little displaced) and finds nothing on
pictures of nothing. This module makes such pictures from the world's own (``degrade``) and from
noise (``noise_image``), and counts the detector's hits and misses by kind (``evaluate``).

    python -m tfds_anchor.anchor.world_bench --n 300
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from typing import Any

import numpy as np

from tfds_anchor.anchor import world, world_detect

# Degradation levels, at a short side of 64 (blur and shift scale with the picture):
# (blur sigma px, noise sigma, max shift px, colour gain spread, colour offset spread, desaturation).
LEVELS = {
    "clean": (0.0, 0.0, 0, 0.0, 0.0, 0.0),
    "mild": (0.8, 5.0, 2, 0.03, 5.0, 0.05),
    "moderate": (1.2, 10.0, 3, 0.05, 8.0, 0.1),
    "strong": (1.8, 16.0, 4, 0.08, 12.0, 0.2),
}


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[i:i + x.shape[0]] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, i:i + x.shape[1]] for i in range(2 * r + 1))


def degrade(image: np.ndarray, rng: np.random.Generator, level: str = "moderate") -> np.ndarray:
    """``image`` as a weak generator might draw it: blurred, shifted, colour-cast, desaturated, noisy."""
    sigma, noise, shift, gain, offset, desat = LEVELS[level]
    scale = min(image.shape[:2]) / 64
    x = _blur(image.astype(np.float32), sigma * scale)
    s = int(round(shift * scale))
    if s:
        dy, dx = (int(a) for a in rng.integers(-s, s + 1, 2))
        x = np.pad(x, ((s, s), (s, s), (0, 0)), mode="edge")[s + dy:s + dy + image.shape[0], s + dx:s + dx + image.shape[1]]
    grey = x.mean(-1, keepdims=True)
    x = x + desat * (grey - x)
    x = x * (1 + gain * rng.uniform(-1, 1, 3)) + offset * rng.uniform(-1, 1, 3)
    x = x + rng.normal(0, noise, x.shape) if noise else x
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def noise_image(rng: np.random.Generator, size: tuple[int, int] = (64, 64), kind: str = "uniform") -> np.ndarray:
    """A picture of nothing: ``uniform`` pixel noise, or ``smooth`` colour blobs (what an untrained
    generator draws), uint8 [h, w, 3] for size (w, h)."""
    w, h = size
    if kind == "uniform":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cells = int(rng.integers(3, 9))
    grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
    ys, xs = np.linspace(0, cells - 1, h), np.linspace(0, cells - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, cells - 1), np.minimum(x0 + 1, cells - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    x = top * (1 - fy) + bottom * fy + rng.normal(0, 8, (h, w, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def evaluate(n: int = 200, seed: int = 0, size: int | tuple[int, int] = 64, level: str = "clean") -> dict[str, Any]:
    """Recall and precision by kind over ``n`` world pictures at ``level``, plus scene accuracy
    (the best-scored scene is the drawn one)."""
    rng = np.random.default_rng([seed, 1])
    hits, placed, claimed = collections.Counter(), collections.Counter(), collections.Counter()
    scene_right = 0
    for i in range(n):
        e = world.example(seed, i, size)
        image = degrade(e["image"], rng, level) if level != "clean" else e["image"]
        det = world_detect.detect(image)
        truth = {s["signature"] for s in e["truth"]["subjects"]}
        got = world_detect.found(det)
        for sig in truth:
            placed[sig.split(":")[0]] += 1
            hits[sig.split(":")[0]] += sig in got
        for sig in got:
            claimed[sig.split(":")[0]] += 1
        scene_right += max(det["scene"], key=det["scene"].get) == e["spec"]["scene"]
    kinds = sorted(placed)
    report = {"n": n, "level": level, "size": size, "scene_top1": scene_right / n}
    for k in kinds:
        report[k] = {"recall": hits[k] / placed[k], "precision": hits[k] / claimed[k] if claimed[k] else 1.0,
                     "placed": placed[k], "claimed": claimed[k]}
    return report


def false_positives(n: int = 200, seed: int = 0, size: tuple[int, int] = (64, 64), kind: str = "uniform",
                    require_sky: bool = True) -> dict[str, Any]:
    """On ``n`` noise pictures: the share with any detection, and detections per picture by kind."""
    rng = np.random.default_rng([seed, 2])
    any_found, by_kind = 0, collections.Counter()
    for _ in range(n):
        got = world_detect.found(world_detect.detect(noise_image(rng, size, kind), require_sky=require_sky))
        any_found += bool(got)
        for sig in got:
            by_kind[sig.split(":")[0]] += 1
    return {"n": n, "kind": kind, "require_sky": require_sky, "pictures_with_any": any_found / n,
            "per_picture": {k: c / n for k, c in sorted(by_kind.items())}}


def speed(n: int = 2000, size: int | tuple[int, int] = 64) -> dict[str, float]:
    """Pictures per second on one core: spec + caption + drawing, and detection."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    pictures = []
    for _ in range(n):
        spec = world.sample_scene(rng)
        world.caption(spec, rng)
        pictures.append(world.draw(spec, size)[0])
    made = time.perf_counter() - t
    world_detect.detect(pictures[0])  # builds the landmark templates once
    t = time.perf_counter()
    for image in pictures[: n // 4]:
        world_detect.detect(image)
    return {"generate_per_s": n / made, "detect_per_s": (n // 4) / (time.perf_counter() - t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = {"speed_64": speed(), "speed_192x128": speed(500, (192, 128))}
    for size in (64, (192, 128)):
        for level in LEVELS:
            out[f"{level}_{size}"] = evaluate(args.n, args.seed, size, level)
    for kind in ("uniform", "smooth"):
        out[f"noise_{kind}"] = false_positives(args.n, args.seed, (64, 64), kind)
    out["noise_smooth_any_sky"] = false_positives(args.n, args.seed, (64, 64), "smooth", require_sky=False)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
