"""CMMD (Jayasumana et al. 2024): the MMD between CLIP image embeddings of two image sets.

The reference is google-research's ``cmmd`` (``distance.py``, ``embedding.py``, ``io_util.py``):

- embeddings: CLIP ViT-L/14@336px image embeddings (``get_image_features`` of
  openai/clip-vit-large-patch14-336), L2-normalised;
- preprocessing (``cmmd_pixels``): the centred square of the shorter side, PIL bicubic to 336²
  (``io_util._center_crop_and_resize``, floored offsets), ``/ 255``, CLIP's mean/std
  (``embedding._clip_preprocess``; its ``jax.image.resize`` to 336² is the identity on images
  io_util already made 336²). The reference reads files with PIL without ``convert("RGB")``:
  grayscale is tiled to 3 channels (the same as converting first), RGBA stops its input pipeline;
  callers here pass RGB arrays;
- the distance (``mmd``): 1000 · MMD² with the Gaussian RBF kernel k(a, b) = exp(−‖a − b‖² / 2σ²),
  σ = 10, by the biased (V-statistic) estimator: the plain means of k over all n², m² and n·m
  pairs, the diagonals k(a, a) = 1 included; the two sets may differ in size.

The reference evaluates that in float32 as ``mean(k_xx) + mean(k_yy) − 2 mean(k_xy)``: three
numbers near 1 whose difference is ~1e-3, so its own float32 result is off its exact value by
~1e-4 relative. Here the same estimator is summed as ``expm1(−γ d²)`` (the 1s cancel exactly,
1 + 1 − 2 = 0), in tiles that bound memory to one tile of the n × m kernel matrix, with the
tile sums accumulated in float64: this matches the reference run in float64 to ~1e-6.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.eval.preprocess import CLIP_MEAN, CLIP_STD, crop_square_resize

SIGMA = 10.0
SCALE = 1000.0
IMAGE_SIZE = 336  # ViT-L/14@336px
_GAMMA = 1.0 / (2.0 * SIGMA**2)
_CHUNK = 128  # kernel values are summed in float32 over runs of this many columns, then in float64


def cmmd_pixels(image: Any, size: int = IMAGE_SIZE) -> np.ndarray:
    """A uint8 [H, W, 3] image as the reference feeds its CLIP: float32 [size, size, 3].

    The reference normalises inside a jitted function, where XLA turns the division by the
    constant std into a product with its float32 reciprocal; doing the same keeps the pixels
    bit-identical (true division, ``preprocess.normalise``, is 1 ulp off in a quarter of them).
    """
    x = crop_square_resize(image, size).astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(CLIP_MEAN, np.float32)) * (np.float32(1.0) / np.asarray(CLIP_STD, np.float32))


def preprocess(images: Sequence[Any], size: int = IMAGE_SIZE) -> np.ndarray:
    """``cmmd_pixels`` of each image, stacked: [N, size, size, 3] float32."""
    return np.stack([cmmd_pixels(image, size) for image in images])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@jax.jit
def _tile_sums(a: jax.Array, a_valid: jax.Array, b: jax.Array, b_valid: jax.Array) -> jax.Array:
    """Per-row sums over runs of ``_CHUNK`` columns of expm1(−γ‖a_i − b_j‖²), padding masked out."""
    dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * dots
    k = jnp.where(a_valid[:, None] & b_valid[None, :], jnp.expm1(-_GAMMA * d2), 0.0)
    return jnp.sum(k.reshape(k.shape[0], -1, _CHUNK), axis=-1)


def _mean_kernel_m1(a: np.ndarray, b: np.ndarray, tile: int) -> float:
    """mean over all pairs of k(a_i, b_j) − 1, in float64 from float32 tiles."""
    total = 0.0
    for i in range(0, a.shape[0], tile):
        for j in range(0, b.shape[0], tile):
            a_tile, a_valid = _pad(a[i:i + tile], tile)
            b_tile, b_valid = _pad(b[j:j + tile], tile)
            total += float(np.sum(np.asarray(_tile_sums(a_tile, a_valid, b_tile, b_valid), np.float64)))
    return total / (a.shape[0] * b.shape[0])


def _pad(x: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` zero-padded to ``rows`` rows, and which rows are real: every tile has one shape."""
    out = np.zeros((rows, x.shape[1]), np.float32)
    out[:x.shape[0]] = x
    return out, np.arange(rows) < x.shape[0]


def mmd(x: Any, y: Any, *, tile: int = 2048) -> float:
    """1000 · MMD² (biased estimator, σ = 10) between embedding sets x [n, D] and y [m, D]:
    the reference's ``distance.mmd``. Pass L2-normalised CLIP embeddings for CMMD."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not (len(x) and len(y)):
        raise SafeJaxError(f"CMMD needs two non-empty [n, D] embedding sets of one width, "
                           f"got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SafeJaxError("CMMD: the embeddings hold NaN or infinity")
    tile = min(_round_up(tile, _CHUNK), _round_up(max(len(x), len(y)), _CHUNK))
    mean = functools.partial(_mean_kernel_m1, tile=tile)
    return SCALE * (mean(x, x) + mean(y, y) - 2.0 * mean(x, y))
