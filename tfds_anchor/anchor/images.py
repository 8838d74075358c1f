"""Any image file in, a clean RGB JPEG out (or the reason it cannot be one).

News archives hold every kind of file: CMYK JPEGs, palette GIFs, RGBA PNGs, 16-bit greyscale,
EXIF-rotated phone pictures, truncated downloads. We decode each one fully (so a broken file is
caught at build time, not in the middle of training), orient it, flatten alpha onto white, cap the
longest side and re-encode as baseline RGB JPEG. An RGB JPEG already within the cap, upright, is
stored byte for byte as it came.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import itertools
import multiprocessing
import warnings
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_ORIENTATION = 0x0112
_T, _R = TypeVar("_T"), TypeVar("_R")


class BadImage(Exception):
    """The image cannot be used; ``reason`` is a key of ``report.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Prepared:
    jpeg: bytes
    width: int
    height: int
    converted_from: str | None   # the original mode when it was not RGB
    reencoded: bool


def prepare(data: bytes, *, max_side: int, min_side: int, quality: int) -> Prepared:
    """Decode ``data`` fully and return it as an RGB JPEG whose longest side is at most ``max_side``.

    Raises BadImage("truncated_image" | "corrupt_image" | "too_large_image" | "tiny_image").
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's warnings on odd metadata: the decode decides
            im = Image.open(io.BytesIO(data))
            fmt, mode, size = im.format, im.mode, im.size
            if fmt == "JPEG" and max(size) > 2 * max_side:
                # Decode at 1/2, 1/4 or 1/8 scale in the DCT domain: much faster, same result after resize.
                scale = max_side / max(size)
                im.draft("RGB", (int(size[0] * scale) + 1, int(size[1] * scale) + 1))
            im.load()
    except Image.DecompressionBombError as e:
        raise BadImage("too_large_image", str(e)) from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, OSError) as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise BadImage(reason, str(e)) from None
    except Exception as e:  # a decoder plugin failing in its own way is still a bad file, not a crash
        raise BadImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    if min(size) < min_side:
        raise BadImage("tiny_image", f"{size[0]}x{size[1]} < {min_side}")

    orientation = im.getexif().get(_ORIENTATION, 1) if fmt in ("JPEG", "TIFF", "PNG", "WEBP") else 1
    pass_through = fmt == "JPEG" and mode == "RGB" and max(size) <= max_side and orientation in (0, 1)
    if pass_through:
        return Prepared(data, size[0], size[1], None, reencoded=False)
    try:
        if orientation not in (0, 1):
            im = ImageOps.exif_transpose(im)
        rgb = to_rgb(im)
    except Exception as e:
        raise BadImage("corrupt_image", f"cannot convert {mode} to RGB: {e}") from None
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        new = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
        rgb = rgb.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=0 if quality >= 95 else 2)
    return Prepared(out.getvalue(), rgb.size[0], rgb.size[1], None if mode == "RGB" else mode, reencoded=True)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for every mode PIL reads: alpha flattened onto white, 16/32-bit and float scaled to 8 bits."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255) else 255.0
        if mode == "F":
            top = 1.0 if a.max(initial=0) <= 1.0 else max(float(a.max()), 1.0)
        a = np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (PIL undoes Adobe's inversion), YCbCr, LAB, HSV


def check(data: bytes, *, min_side: int) -> str | None:
    """The mode an image would be converted from, after a full decode; raises BadImage like ``prepare``.

    The build's first pass: it decides which records exist before any split is written (TFDS cannot
    write a split that ends up empty), without paying for the JPEG encode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            fmt, mode, size = im.format, im.mode, im.size
            if fmt == "JPEG":
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))  # smallest DCT scale: still reads every byte
            im.load()
    except Image.DecompressionBombError as e:
        raise BadImage("too_large_image", str(e)) from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, OSError) as e:
        raise BadImage("truncated_image" if "truncated" in str(e).lower() else "corrupt_image", str(e)) from None
    except Exception as e:
        raise BadImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    if min(size) < min_side:
        raise BadImage("tiny_image", f"{size[0]}x{size[1]} < {min_side}")
    return None if mode == "RGB" else mode


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], chunk: int = 64) -> Iterator[_R]:
    """``map(fn, items)`` in threads, in order, a chunk at a time (PIL decodes without the GIL).

    ``items`` is consumed a chunk at a time too: a stream of records with their images in memory
    (parquet, tar) holds one chunk of them, however long the stream.
    """
    workers = max(1, min(8, multiprocessing.cpu_count()))
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while block := list(itertools.islice(items, chunk)):
            yield from pool.map(fn, block)
