"""A ground-truth detector for the synthetic news world: which of its subjects a picture shows.

It knows the world's signatures (``world_vocab``) and looks for them, so it judges a generated
picture by the same rules that drew the training pictures, with no learned weights to doubt. A
picture is brought to a short side of 64 and lightly smoothed; a colour then counts only where it
covers a patch, never as scattered pixels, which is what keeps pure noise (where every colour turns
up somewhere) from reading as a subject. Colour alone is not enough either (a generator's blobs
can be any colour), so each subject is also checked for the layout it is drawn with: a shirt with
a head above and legs below, a stone-coloured silhouette of the right shape with sky above it, sky
across the top, flames on a roof, a carpet from the bottom edge to the horizon. And a picture
with no sky across its top is not taken for a picture of the world at all (see ``detect``).
Pure numpy (PIL only draws the landmark templates, with the world's own drawing code).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from tfds_anchor.anchor import world_draw, world_vocab as v

SIDE = 64            # analysis short side
THRESHOLD = 0.5      # a score at or above it counts as present
_SKIES = np.array([c.sky for c in v.CITIES], dtype=np.float32)


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Area weights that take ``n_in`` samples to ``n_out`` (down or up), rows summing to one."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    if n_out > n_in:  # upsampling: each output takes the source pixel it falls in
        overlap = ((j <= (lo + hi) / 2) & ((lo + hi) / 2 < j + 1)).astype(np.float64)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def _analysis(image: np.ndarray) -> np.ndarray:
    """The picture at a short side of SIDE, lightly smoothed, float32 [h, w, 3]."""
    h, w = image.shape[:2]
    scale = SIDE / min(h, w)
    oh, ow = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    x = image.astype(np.float32)
    k = h // oh
    if (oh, ow) != (h, w) and h == oh * k and w == ow * k:  # 128 or 192×128: average k×k blocks
        x = x.reshape(oh, k, ow, k, 3).mean(axis=(1, 3))
    elif (oh, ow) != (h, w):
        x = np.einsum("ij,jkc,lk->ilc", _resample_matrix(h, oh), x, _resample_matrix(w, ow), optimize=True)
    # A light [1, 2, 1] smoothing: pixel noise averages out, a head of five pixels survives.
    x = np.pad(x, ((1, 1), (0, 0), (0, 0)), mode="edge")
    x = 0.25 * x[:-2] + 0.5 * x[1:-1] + 0.25 * x[2:]
    x = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]


def _box_mean(mask: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Mean of ``mask`` over a kh×kw window centred on each pixel (zero padding)."""
    h, w = mask.shape
    pad = np.zeros((h + kh, w + kw), dtype=np.float32)
    pad[kh // 2 + 1:kh // 2 + 1 + h, kw // 2 + 1:kw // 2 + 1 + w] = mask
    s = pad.cumsum(0).cumsum(1)
    return (s[kh:, kw:] - s[:-kh, kw:] - s[kh:, :-kw] + s[:-kh, :-kw]) / (kh * kw)


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``x`` moved down by dy and right by dx (negative: up, left), zeros coming in."""
    out = np.zeros_like(x)
    h, w = x.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _best_shift(x: np.ndarray, dys: Sequence[int], dxs: Sequence[int]) -> np.ndarray:
    """At each pixel, the largest value of ``x`` found (dy, dx) away, for any of the offsets."""
    rows = np.zeros_like(x)
    for dy in dys:
        np.maximum(rows, _shift(x, -dy, 0), out=rows)
    out = np.zeros_like(x)
    for dx in dxs:
        np.maximum(out, _shift(rows, 0, -dx), out=out)
    return out


def _ramp(x, lo: float, hi: float):
    """0 below lo, 1 above hi, linear between (hi < lo for a falling ramp)."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _world_palette() -> np.ndarray:
    """Every colour the world draws, each of which competes for the pixels near it."""
    colours = [c.sky for c in v.CITIES] + [v.pavement(c) for c in v.CITIES]
    colours += [m.colour for m in v.LANDMARKS] + [q.shirt for q in v.PEOPLE] + [q.hat_colour for q in v.PEOPLE]
    colours += list(v.SKINS) + list(v.CROWD)
    colours += [v.WATER, v.RIPPLE, v.PITCH, v.LINE, v.FLAME, v.FLAME_CORE, v.SMOKE, v.WAREHOUSE, v.PLACARD,
                v.PLACARD_TEXT, v.STICK, v.LECTERN, v.MICROPHONE, v.CARPET, v.TROUSERS, v.CLOCK_FACE]
    return np.unique(np.array(colours, dtype=np.float32), axis=0)


_PALETTE = _world_palette()
_MARGIN = 20.0  # a pixel may count for a colour while another is nearer by less than this


@functools.lru_cache(maxsize=None)
def _palette_members(colours: tuple[v.RGB, ...]) -> np.ndarray:
    """Indices into the palette of ``colours`` (each of which the world draws)."""
    return np.array([int(np.abs(_PALETTE - np.float32(c)).sum(-1).argmin()) for c in colours])


def _member_mask(members: np.ndarray) -> np.ndarray:
    """A boolean over the palette, true at ``members``."""
    mask = np.zeros(len(_PALETTE), dtype=bool)
    mask[members] = True
    return mask


class _Picture:
    """Colour masks of one analysis picture, each computed once."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.h, self.w = x.shape[:2]
        self.u = min(self.h, self.w)
        # Channel by channel rather than as a matrix product: a product this small pays more for
        # BLAS's threads than it gains, badly so on a busy machine.
        d2 = sum((x[None, :, :, c] - _PALETTE[:, c, None, None]) ** 2 for c in range(3))
        self._d = np.sqrt(d2)  # [colour, h, w]
        # The three nearest colours of each pixel, nearest first.
        d = self._d.reshape(len(_PALETTE), -1).copy()
        cols = np.arange(d.shape[1])
        self._near3, self._d3 = [], []
        for _ in range(3):
            i = d.argmin(0)
            self._near3.append(i.reshape(self.h, self.w))
            self._d3.append(d[i, cols].reshape(self.h, self.w))
            d[i, cols] = np.inf
        self._cache: dict[tuple, np.ndarray] = {}

    def near(self, colours: Sequence[v.RGB], radius: float, margin: float = _MARGIN) -> np.ndarray:
        """1 where a pixel lies within ``radius`` (RGB) of one of ``colours`` and no other colour of
        the world is nearer by ``margin`` or more: a pixel of a competing colour does not count,
        however close the two colours are, while a colour cast that moves every pixel alike is
        tolerated."""
        key = ("near", tuple(colours), radius, margin)
        if key not in self._cache:
            mine = _palette_members(tuple(colours))
            own = self._d[mine].min(0)
            if len(mine) < 3:  # the nearest colour that is not one of ours is among the three nearest
                rival = np.full(own.shape, np.inf, dtype=np.float32)
                for k in (2, 1, 0):
                    theirs = (self._near3[k] != mine[0]) & (self._near3[k] != mine[-1])
                    rival[theirs] = self._d3[k][theirs]
            else:
                rival = self._d[~_member_mask(mine)].min(0)
            self._cache[key] = ((own <= radius) & (own <= rival + margin)).astype(np.float32)
        return self._cache[key]

    def spread(self, kh: int, kw: int) -> np.ndarray:
        """The colour's standard deviation (RGB, averaged over channels) in a kh×kw window."""
        key = ("spread", kh, kw)
        if key not in self._cache:
            var = sum(_box_mean(c * c, kh, kw) - _box_mean(c, kh, kw) ** 2 for c in np.moveaxis(self.x, -1, 0))
            self._cache[key] = np.sqrt(np.maximum(var / 3, 0))
        return self._cache[key]

    def solid(self, colours: Sequence[v.RGB], radius: float, k: int = 3, fill: float = 0.6,
              margin: float = _MARGIN) -> np.ndarray:
        """``near``, kept only where it fills most of a k×k patch."""
        key = ("solid", tuple(colours), radius, k, fill, margin)
        if key not in self._cache:
            self._cache[key] = (_box_mean(self.near(colours, radius, margin), k, k) >= fill).astype(np.float32)
        return self._cache[key]

    def rows(self, top: float, bottom: float) -> slice:
        a = int(round(top * self.h))
        return slice(a, max(a + 1, int(round(bottom * self.h))))


def _cities(p: _Picture) -> tuple[dict[str, float], float]:
    """The sky's colour across the top of the picture: each flat pixel of the band goes to the
    nearest city sky if one is near. Also returns how much of the band is sky of any city."""
    rows = p.rows(0.0, 0.2)
    band = p.x[rows]
    d2 = ((band[:, :, None, :] - _SKIES[None, None]) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    close = (np.take_along_axis(d2, nearest[..., None], -1)[..., 0] <= 55.0**2) * _ramp(p.spread(3, 3)[rows], 12.0, 7.0)
    cities = {c.key: float(_ramp(np.mean(close * (nearest == i)), 0.2, 0.5)) for i, c in enumerate(v.CITIES)}
    return cities, float(close.mean())


def _people(p: _Picture) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """A block of the person's shirt colour (arms out), not part of a larger field of it, with a
    small patch of their skin (the head) above it and legs (or the water or lectern hiding them)
    below. At a short side of 64 a figure is 23-29 pixels high: the head's centre 6-8 rows above
    the shirt's, the legs' 8-11 rows below it. Returns scores and each shirt's centre (row, column)."""
    legs = _ramp(_box_mean(p.near((v.TROUSERS, v.WATER, v.LECTERN), 55), 3, 5), 0.3, 0.7)
    legs = _best_shift(legs, range(6, 13), range(-1, 2))
    heads = {}
    for i, tone in enumerate(v.SKINS):  # a blurred head drifts towards the next tone, never two away
        skin = p.near(v.SKINS[max(0, i - 1):i + 2], 50)
        head = _ramp(_box_mean(skin, 3, 3), 0.35, 0.75) * _ramp(_box_mean(skin, 9, 9), 0.6, 0.4)
        heads[tone] = _best_shift(head, range(-10, -3), range(-2, 3)) * legs
    # Flat colour in the middle of the shirt, as a drawn shirt is even when blurred, and a
    # generator's gradient of colour is not.
    flat = _ramp(p.spread(3, 5), 10.0, 6.0)
    scores, centres = {}, {}
    for person in v.PEOPLE:
        shirt = p.near((person.shirt,), 60)
        block = _ramp(_box_mean(shirt, 5, 7), 0.5, 0.8) * flat
        alone = _ramp(_box_mean(shirt, 15, 23), 0.6, 0.45)
        combined = block * alone * heads[person.skin]
        i = int(combined.argmax())
        scores[person.key] = float(combined.flat[i])
        centres[person.key] = divmod(i, p.w)
    return scores, centres


@functools.lru_cache(maxsize=None)
def _template(key: str, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The landmark's silhouette ``height`` pixels high as the share of each pixel its own colour
    covers (so that thin parts, a deck or columns, are not lost at small sizes), and where the
    silhouette (with its other parts, a clock face) or its blurred edge may be: outside that, its
    colour counts against it."""
    m = v.LANDMARK_BY_KEY[key]
    H = 8 * height
    W = int(m.aspect * H * 1.3) + 16
    im = Image.new("RGB", (W, H + 16), (0, 0, 0))
    world_draw.landmark(ImageDraw.Draw(im), m, W / 2, H + 8, H)
    pixels = np.asarray(im)
    own = (pixels == np.array(m.colour, dtype=np.uint8)).all(-1)
    other = pixels.any(-1) & ~own
    ys, xs = np.nonzero(own | other)
    crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    th = height
    tw = max(1, int(round((xs.max() + 1 - xs.min()) * height / (ys.max() + 1 - ys.min()))))
    ry, rx = _resample_matrix(ys.max() + 1 - ys.min(), th), _resample_matrix(xs.max() + 1 - xs.min(), tw)
    covered = ry @ (own | other)[crop].astype(np.float32) @ rx.T > 0.05
    near = _box_mean(covered.astype(np.float32), 3, 3) > 0  # a pixel's width around it, where blur spills
    return ry @ own[crop].astype(np.float32) @ rx.T, near.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _template_spectra(key: str, height: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The conjugate spectra of ``_template``'s two masks, for correlating by FFT."""
    t, near = _template(key, height)
    return np.conj(np.fft.rfft2(t, shape)), np.conj(np.fft.rfft2(near, shape))


def _correlate(spectrum: np.ndarray, template_spectrum: np.ndarray, shape: tuple[int, int],
               fits: tuple[int, int]) -> np.ndarray:
    """sum(template * picture window) for every top-left corner at which the template fits, from
    the spectra of both (zero-padded to ``shape``, at least the picture's plus the template's)."""
    return np.fft.irfft2(spectrum * template_spectrum, shape)[:fits[0], :fits[1]]


# What may stand in front of a landmark and hide part of it.
_FOREGROUND = tuple(q.shirt for q in v.PEOPLE) + tuple({q.hat_colour for q in v.PEOPLE}) + v.SKINS + v.CROWD + (
    v.PLACARD, v.PLACARD_TEXT, v.TROUSERS, v.FLAME, v.FLAME_CORE, v.SMOKE, v.WAREHOUSE)


def _landmarks(p: _Picture) -> tuple[dict[str, float], dict[str, list[int]]]:
    """The stone colour filling a silhouette of the landmark's shape (anywhere, at the sizes
    drawn), little of it in the rest of the silhouette's box, and sky just above: a patch of the
    right colour but the wrong shape scores low, a silhouette partly hidden by people still scores
    (what hides it counts neither for nor against it, as long as half the silhouette shows)."""
    u = p.u
    low = int(round(0.66 * p.h))  # legs and ground are never part of a landmark
    sky = _box_mean(p.near(tuple(c.sky for c in v.CITIES), 55) * _ramp(p.spread(3, 3), 12.0, 7.0), 3, 1)
    in_front = p.solid(_FOREGROUND, 45, margin=5.0) * _ramp(p.spread(3, 3), 12.0, 7.0)
    heights = range(int(0.3 * u), int(0.46 * u) + 1, 2)
    shape = (p.h + heights[-1] + 1, p.w + int(max(m.aspect for m in v.LANDMARKS) * heights[-1] * 1.3) + 8)
    scores, where = {}, {}
    for lm in v.LANDMARKS:
        mask = p.solid((lm.colour,), 50, fill=0.5, margin=5.0).copy()
        mask[low:] = 0
        if mask.sum() < 0.02 * u * u:
            scores[lm.key] = 0.0
            continue
        visible = 1.0 - in_front * (1.0 - mask)
        mask_f, visible_f = np.fft.rfft2(mask, shape), np.fft.rfft2(visible, shape)
        # Sums over the silhouette's box widened by two pixels left, right and above, where a blob
        # of the right colour but larger than the landmark shows.
        integral = np.pad(mask, ((3, 0), (3, 2))).cumsum(0).cumsum(1)
        best, best_box = 0.0, None
        for height in heights:
            t, near = _template(lm.key, height)
            th, tw = t.shape
            if th + 3 > p.h or tw > p.w:
                continue
            t_f, near_f = _template_spectra(lm.key, height, shape)
            fits = (p.h - th + 1, p.w - tw + 1)
            eh, ew = th + 2, tw + 4
            box = (integral[eh:, ew:] - integral[:-eh, ew:] - integral[eh:, :-ew] + integral[:-eh, :-ew])
            spill = (box[:fits[0], :fits[1]] - _correlate(mask_f, near_f, shape, fits)) / max(1.0, eh * ew - near.sum())
            # Coverage of what is not hidden by people, placards or flames in front of it.
            seen, filled = _correlate(visible_f, t_f, shape, fits), _correlate(mask_f, t_f, shape, fits)
            coverage = filled / np.maximum(seen, 1.0) * _ramp(filled / t.sum(), 0.3, 0.5)
            # sky in the two rows above the silhouette's top, across its middle half
            above = _box_mean(sky, 1, max(1, tw // 2))
            top_sky = np.zeros_like(coverage)
            top_sky[2:] = above[:coverage.shape[0] - 2, tw // 2:tw // 2 + coverage.shape[1]]
            fit = (coverage - spill) * _ramp(top_sky, 0.2, 0.6)
            i = int(fit.argmax())
            if fit.flat[i] > best:
                y, x = divmod(i, fit.shape[1])
                best, best_box = float(fit.flat[i]), [x, y, x + tw, y + th]
        scores[lm.key] = float(_ramp(best, 0.3, 0.6))
        if best_box is not None:
            where[lm.key] = best_box
    return scores, where


def _across(region: np.ndarray) -> float:
    """A colour that fills a band of the picture from side to side (the water of a flood, a
    pitch), judged on its thinnest quarter so that one large blob is not enough."""
    quarters = sorted(q.mean() for q in np.array_split(region, 4, axis=1))
    return float(_ramp(quarters[0], 0.1, 0.3) * _ramp(quarters[1], 0.2, 0.45))


def _scenes(p: _Picture, people: dict[str, float], centres: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Each scene's own colour where it is drawn, in the layout it is drawn with."""
    u2 = float(p.u) ** 2
    low = p.rows(0.72, 1.0)
    # Placards: white patches above the crowd's heads (pitch lines and the goal lie lower).
    placards = p.solid((v.PLACARD,), 55)[p.rows(0.1, 0.56)].sum() / u2
    # Flames: orange on top of a dark warehouse roof, not a field of orange.
    flames = p.solid((v.FLAME, v.FLAME_CORE), 60)
    roof = _best_shift(p.solid((v.WAREHOUSE,), 40), range(1, 9), (0,))
    on_roof = (flames * roof).sum() / max(1.0, flames.sum())
    fire = _ramp(flames.sum() / u2, 0.004, 0.012) * _ramp(flames.sum() / u2, 0.2, 0.12) * _ramp(on_roof, 0.05, 0.2)
    # A lectern: brown where the legs of someone found would be.
    lectern = p.solid((v.LECTERN,), 50)
    speech = 0.0
    for key, (y, x) in centres.items():
        if people[key] >= THRESHOLD:
            speech = max(speech, float(_ramp(lectern[y + 4:y + 12, max(0, x - 4):x + 5].mean(), 0.15, 0.35)))
    # A carpet: along the bottom edge, narrowing towards the horizon, none of it in the sky.
    carpet = p.solid((v.CARPET,), 55)
    area = carpet[p.rows(0.5, 1.0)].sum() / u2
    visit = (_ramp(carpet[p.rows(0.88, 1.0)].mean(), 0.04, 0.1) * _ramp(area, 0.02, 0.05)
             * _ramp(carpet[: p.rows(0.0, 0.5).stop].sum() / u2, 0.02, 0.005) * _ramp(area, 0.4, 0.3))
    return {
        "protest": float(_ramp(placards, 0.006, 0.015)),
        "flood": _across(p.near((v.WATER,), 55)[low]),
        "fire": float(fire),
        "match": _across(p.near((v.PITCH, v.LINE), 60)[low]),
        "speech": speech,
        "visit": float(visit),
    }


def detect(image: np.ndarray, require_sky: bool = True) -> dict[str, Any]:
    """Scores in [0, 1] for every subject of the world in ``image`` (uint8 [H, W, 3], any size):
    ``{"scene": {key: s}, "people": {key: s}, "landmarks": {key: s}, "city": {key: s},
    "signatures": {"person:okafor": s, ...}, "where": {signature: [x0, y0, x1, y1]}, "sky": f}``,
    boxes in the picture's own pixels for the people and landmarks found. A score of THRESHOLD or
    more means present.

    ``sky`` is the share of the top fifth of the picture that is flat sky of some city. Every
    picture of the world has one, and it is the easiest thing for a generator to learn; so with
    ``require_sky`` a picture with little sky is not taken for a picture of the world and all its
    scores shrink towards zero, which keeps blobs of colour that happen to look like a figure or
    a tower from counting."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {image.shape}")
    p = _Picture(_analysis(image[..., :3]))
    people, centres = _people(p)
    people_at = {k: [x - 7, y - 12, x + 8, y + 10] for k, (y, x) in centres.items()}
    landmarks, landmarks_at = _landmarks(p)
    scenes, (cities, sky) = _scenes(p, people, centres), _cities(p)
    if require_sky:
        gate = float(_ramp(sky, 0.4, 0.55))
        people, landmarks, scenes = ({k: s * gate for k, s in d.items()} for d in (people, landmarks, scenes))
    signatures = {**{f"scene:{k}": s for k, s in scenes.items()}, **{f"person:{k}": s for k, s in people.items()},
                  **{f"landmark:{k}": s for k, s in landmarks.items()}, **{f"city:{k}": s for k, s in cities.items()}}
    scale = image.shape[0] / p.h
    where = {}
    for kind, found_, boxes in (("person", people, people_at), ("landmark", landmarks, landmarks_at)):
        for k, s in found_.items():
            if s >= THRESHOLD and k in boxes:
                x0, y0, x1, y1 = boxes[k]
                where[f"{kind}:{k}"] = [int(max(0, round(x0 * scale))), int(max(0, round(y0 * scale))),
                                        int(min(image.shape[1], round(x1 * scale))),
                                        int(min(image.shape[0], round(y1 * scale)))]
    return {"scene": scenes, "people": people, "landmarks": landmarks, "city": cities,
            "signatures": signatures, "where": where, "sky": sky}


def found(detection: dict[str, Any], threshold: float = THRESHOLD) -> set[str]:
    """The signatures a detection counts as present."""
    return {s for s, score in detection["signatures"].items() if score >= threshold}


def subject_score(image_or_detection: np.ndarray | dict[str, Any], subject: str) -> float | None:
    """How surely the picture shows the subject a caption names ("Maria Okafor", "the cathedral",
    "flood water"), in [0, 1]; None for a subject the world never draws (it cannot be judged).
    Pass a ``detect`` result instead of the picture to judge several subjects at the cost of one."""
    signature = v.signature_of(subject)
    if signature is None:
        return None
    detection = image_or_detection if isinstance(image_or_detection, dict) else detect(image_or_detection)
    return detection["signatures"][signature]


def subject_present(image_or_detection: np.ndarray | dict[str, Any], subject: str,
                    threshold: float = THRESHOLD) -> bool | None:
    """Whether the picture shows the subject; None for a subject the world never draws."""
    score = subject_score(image_or_detection, subject)
    return None if score is None else score >= threshold
