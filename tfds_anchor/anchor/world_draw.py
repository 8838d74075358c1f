"""Pictures of the synthetic news world, drawn from a scene spec, with where each subject ended up.

A spec fixes the layout in fractions of the picture (positions of the width and height, sizes of
the shorter side), so the same spec draws the same scene at 64×64, 128×128 or 192×128 and the
ground truth boxes scale with it. Only numpy and PIL's ImageDraw primitives are used (no fonts, no
antialiasing), so a spec gives the same bytes on every machine with the same Pillow (whose
rasterising of ellipses has changed between releases, if rarely). Small details (crowd figures,
ripples, placards) come from the spec's ``details`` seed, not from a caller's generator, so drawing
never disturbs the stream that sampled the spec.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tfds_anchor.anchor import world_vocab as v

Box = list[int]


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, numbers.Integral) else (int(size[0]), int(size[1]))


def _background(w: int, h: int, horizon: int, sky: v.RGB, ground: v.RGB) -> np.ndarray:
    """A sky that lightens a little towards the horizon over a flat ground."""
    rows = np.arange(h, dtype=np.float32)[:, None]
    shade = np.where(rows < horizon, 10.0 * (rows / max(horizon, 1) - 0.5), 0.0)
    colour = np.where(rows < horizon, np.float32(sky)[None, :], np.float32(ground)[None, :]) + shade
    line = np.clip(colour, 0, 255).astype(np.uint8)  # one pixel per row, then broadcast along the row
    return np.ascontiguousarray(np.broadcast_to(line[:, None, :], (h, w, 3)))


def _figure(d: ImageDraw.ImageDraw, x: float, foot: float, hh: float, body: v.RGB, skin: v.RGB) -> None:
    """A crowd figure: small, muted, hatless, so that it is never taken for a named person."""
    d.rectangle([x - 0.17 * hh, foot - 0.76 * hh, x + 0.17 * hh, foot], fill=body)
    d.ellipse([x - 0.11 * hh, foot - hh, x + 0.11 * hh, foot - 0.78 * hh], fill=skin)


def _person(d: ImageDraw.ImageDraw, p: v.Person, x: float, f: float, H: float) -> Box:
    """A named person: a wide block of their own shirt colour under a head and a hat of their own."""
    hc = p.hat_colour
    if p.hat == "long_hair":  # behind the head and over the shoulders
        d.rectangle([x - 0.15 * H, f - 0.86 * H, x + 0.15 * H, f - 0.62 * H], fill=hc)
    d.rectangle([x - 0.13 * H, f - 0.40 * H, x - 0.02 * H, f], fill=v.TROUSERS)
    d.rectangle([x + 0.02 * H, f - 0.40 * H, x + 0.13 * H, f], fill=v.TROUSERS)
    d.rectangle([x - 0.25 * H, f - 0.72 * H, x + 0.25 * H, f - 0.40 * H], fill=p.shirt)
    if p.hat == "long_hair":
        d.ellipse([x - 0.16 * H, f - 0.98 * H, x + 0.16 * H, f - 0.70 * H], fill=hc)
    d.ellipse([x - 0.12 * H, f - 0.94 * H, x + 0.12 * H, f - 0.70 * H], fill=p.skin)
    if p.hat == "bun":
        d.chord([x - 0.12 * H, f - 0.95 * H, x + 0.12 * H, f - 0.79 * H], 180, 360, fill=hc)
        d.ellipse([x - 0.07 * H, f - 1.0 * H, x + 0.07 * H, f - 0.89 * H], fill=hc)
    elif p.hat == "top_hat":
        d.rectangle([x - 0.08 * H, f - 1.0 * H, x + 0.08 * H, f - 0.9 * H], fill=hc)
        d.rectangle([x - 0.14 * H, f - 0.92 * H, x + 0.14 * H, f - 0.89 * H], fill=hc)
    elif p.hat == "cap":
        d.chord([x - 0.13 * H, f - 0.97 * H, x + 0.13 * H, f - 0.79 * H], 180, 360, fill=hc)
        d.rectangle([x, f - 0.9 * H, x + 0.21 * H, f - 0.87 * H], fill=hc)
    elif p.hat == "beret":
        d.ellipse([x - 0.17 * H, f - 1.0 * H, x + 0.09 * H, f - 0.88 * H], fill=hc)
    elif p.hat == "helmet":
        d.chord([x - 0.14 * H, f - 1.0 * H, x + 0.14 * H, f - 0.78 * H], 180, 360, fill=hc)
        d.rectangle([x - 0.17 * H, f - 0.91 * H, x + 0.17 * H, f - 0.88 * H], fill=hc)
    return [x - 0.25 * H, f - H, x + 0.25 * H, f]


def landmark(d: ImageDraw.ImageDraw, m: v.Landmark, cx: float, base: float, H: float) -> Box:
    """A silhouette standing on the horizon, ``H`` high and ``m.aspect * H`` wide (the detector
    draws its templates with it too, so that it looks for exactly what was drawn)."""
    W = m.aspect * H
    x0, x1, top = cx - W / 2, cx + W / 2, base - H
    c = m.colour
    if m.shape == "bridge":  # two towers with pointed roofs, a high walkway and the deck
        tw = 0.17 * W
        for tx in (x0 + 0.12 * W, x1 - 0.12 * W - tw):
            d.rectangle([tx, top + 0.18 * H, tx + tw, base], fill=c)
            d.polygon([(tx - 0.02 * W, top + 0.2 * H), (tx + tw / 2, top), (tx + tw + 0.02 * W, top + 0.2 * H)], fill=c)
        d.rectangle([x0 + 0.12 * W, top + 0.3 * H, x1 - 0.12 * W, top + 0.38 * H], fill=c)
        d.rectangle([x0, base - 0.3 * H, x1, base - 0.2 * H], fill=c)
    elif m.shape == "spire":  # a nave with a tall spire at one end
        d.rectangle([x0, base - 0.38 * H, x1 - 0.25 * W, base], fill=c)
        d.rectangle([x1 - 0.4 * W, base - 0.55 * H, x1 - 0.05 * W, base], fill=c)
        d.polygon([(x1 - 0.4 * W, base - 0.55 * H), (x1 - 0.225 * W, top), (x1 - 0.05 * W, base - 0.55 * H)], fill=c)
    elif m.shape == "dome":  # a block, a drum and a hemisphere with a lantern
        d.rectangle([x0, base - 0.4 * H, x1, base], fill=c)
        d.rectangle([cx - 0.3 * W, base - 0.55 * H, cx + 0.3 * W, base - 0.38 * H], fill=c)
        d.chord([cx - 0.3 * W, base - 0.88 * H, cx + 0.3 * W, base - 0.25 * H], 180, 360, fill=c)
        d.rectangle([cx - 0.04 * W, top, cx + 0.04 * W, base - 0.8 * H], fill=c)
    elif m.shape == "clock_tower":  # a tall shaft, a clock face, a pyramid roof
        d.rectangle([x0, top + 0.22 * H, x1, base], fill=c)
        d.polygon([(x0 - 0.05 * W, top + 0.24 * H), (cx, top), (x1 + 0.05 * W, top + 0.24 * H)], fill=c)
        r = 0.17 * W
        d.ellipse([cx - r, top + 0.36 * H - r, cx + r, top + 0.36 * H + r], fill=v.CLOCK_FACE)
    elif m.shape == "temple":  # a pediment on columns on a plinth
        d.polygon([(x0, top + 0.28 * H), (cx, top), (x1, top + 0.28 * H)], fill=c)
        d.rectangle([x0, top + 0.28 * H, x1, top + 0.38 * H], fill=c)
        d.rectangle([x0 - 0.03 * W, base - 0.12 * H, x1 + 0.03 * W, base], fill=c)
        n = 5
        for i in range(n):
            colx = x0 + 0.04 * W + i * (0.92 * W - 0.1 * W) / (n - 1)
            d.rectangle([colx, top + 0.38 * H, colx + 0.1 * W, base - 0.12 * H], fill=c)
    else:  # "arch": a long low hall under one great arched roof
        d.rectangle([x0, base - 0.45 * H, x1, base], fill=c)
        d.chord([x0 + 0.1 * W, top, x1 - 0.1 * W, base - 0.1 * H], 180, 360, fill=c)
    return [x0 - 0.05 * W, top, x1 + 0.05 * W, base]


def _union(boxes: list[Box]) -> Box:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def _clip(box: Box, w: int, h: int) -> Box:
    x0, y0, x1, y1 = box
    return [int(max(0, np.floor(x0))), int(max(0, np.floor(y0))), int(min(w, np.ceil(x1))), int(min(h, np.ceil(y1)))]


def draw(spec: dict[str, Any], size: int | tuple[int, int] = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """The picture of ``spec`` at ``size`` (an int for a square, else (width, height)) as uint8
    [height, width, 3], and its ground truth: ``{"size": [w, h], "subjects": [{"signature",
    "kind", "name", "box": [x0, y0, x1, y1]}, ...]}`` with boxes in pixels (end exclusive)."""
    w, h = _size(size)
    u = float(min(w, h))
    rng = np.random.default_rng(spec["details"])
    r = lambda: float(rng.random())
    city = v.CITY_BY_KEY[spec["city"]]
    scene = spec["scene"]
    hz = spec["horizon"] * h
    ground = {"flood": v.WATER, "match": v.PITCH}.get(scene, v.pavement(city))
    im = Image.fromarray(_background(w, h, int(round(hz)), city.sky, ground))
    d = ImageDraw.Draw(im)
    placed: list[dict[str, Any]] = [{"signature": f"city:{city.key}", "kind": "place", "name": city.name,
                                     "box": [0.0, 0.0, float(w), hz]}]
    scene_boxes: list[Box] = []
    lw = max(1, int(round(u / 48)))

    if spec.get("landmark"):
        lm = spec["landmark"]
        m = v.LANDMARK_BY_KEY[lm["key"]]
        box = landmark(d, m, lm["x"] * w, hz, lm["height"] * u)
        placed.append({"signature": f"landmark:{m.key}", "kind": "place", "name": m.name, "box": box})

    if scene == "flood":
        scene_boxes.append([0, hz, w, h])
        for _ in range(10):
            y, x, length = hz + (h - hz) * (0.1 + 0.85 * r()), w * r(), u * (0.08 + 0.12 * r())
            d.line([x, y, x + length, y], fill=v.RIPPLE, width=lw)
        for _ in range(3):  # residents wading in the distance, water up to their waists
            foot, hh = hz + (h - hz) * (0.1 + 0.2 * r()), u * (0.12 + 0.05 * r())
            x = w * r()
            _figure(d, x, foot, hh, v.CROWD[int(rng.integers(len(v.CROWD)))], v.SKINS[int(rng.integers(3))])
            d.rectangle([x - 0.3 * hh, foot - 0.4 * hh, x + 0.3 * hh, foot + 1], fill=v.WATER)
    elif scene == "match":
        scene_boxes.append([0, hz, w, h])
        d.line([0, hz + 0.06 * (h - hz), w, hz + 0.06 * (h - hz)], fill=v.LINE, width=lw)
        mid = hz + 0.5 * (h - hz)
        d.line([0, mid, w, mid], fill=v.LINE, width=lw)
        cx = w * (0.35 + 0.3 * r())
        d.ellipse([cx - 0.3 * u, mid - 0.1 * u, cx + 0.3 * u, mid + 0.1 * u], outline=v.LINE, width=lw)
        gx = w * (0.08 if r() < 0.5 else 0.78)  # a goal on the far touchline
        d.rectangle([gx, hz - 0.02 * u, gx + 0.16 * u, hz + 0.09 * u], outline=v.LINE, width=lw)
    elif scene == "fire":
        fx = spec["fire_x"] * w
        roof = hz - 0.15 * u
        d.rectangle([fx - 0.17 * u, roof, fx + 0.17 * u, hz + 0.03 * u], fill=v.WAREHOUSE)
        for _ in range(3):  # smoke drifting up from the flames
            sx, sy, sr = fx + u * (0.1 * r() - 0.05), roof - u * (0.25 + 0.15 * r()), u * (0.06 + 0.04 * r())
            d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=v.SMOKE)
        flames = []
        for i in range(4):
            bx = fx - 0.17 * u + i * 0.085 * u
            peak = roof - u * (0.12 + 0.1 * r())
            d.polygon([(bx - 0.02 * u, roof + 0.04 * u), (bx + 0.045 * u, peak), (bx + 0.11 * u, roof + 0.04 * u)],
                      fill=v.FLAME)
            d.polygon([(bx + 0.015 * u, roof + 0.04 * u), (bx + 0.045 * u, peak + 0.45 * (roof - peak)),
                       (bx + 0.075 * u, roof + 0.04 * u)], fill=v.FLAME_CORE)
            flames.append([bx - 0.02 * u, peak, bx + 0.11 * u, roof + 0.04 * u])
        scene_boxes.append(_union(flames + [[fx - 0.17 * u, roof, fx + 0.17 * u, hz + 0.03 * u]]))
    elif scene == "protest":
        heads = []
        lm = spec.get("landmark")
        middle = (lm["x"] * w, 0.3 * v.LANDMARK_BY_KEY[lm["key"]].aspect * lm["height"] * u) if lm else (0.0, -1.0)
        for _ in range(9):
            foot, hh = hz + (h - hz) * (0.05 + 0.2 * r()), u * (0.15 + 0.06 * r())
            x = w * (0.03 + 0.94 * r())
            _figure(d, x, foot, hh, v.CROWD[int(rng.integers(len(v.CROWD)))], v.SKINS[int(rng.integers(3))])
            if abs(x - middle[0]) > middle[1] + 0.1 * u:  # no placard hides the landmark's middle
                heads.append((x, foot - hh))
        for x, top in heads[:4]:  # placards held up on sticks
            pw, ph = 0.11 * u, 0.12 * u
            y1 = top - 0.03 * u
            d.line([x, y1, x, top + 0.05 * u], fill=v.STICK, width=lw)
            d.rectangle([x - pw, y1 - ph, x + pw, y1], fill=v.PLACARD)
            d.line([x - 0.5 * pw, y1 - 0.7 * ph, x + 0.5 * pw, y1 - 0.7 * ph], fill=v.PLACARD_TEXT, width=lw)
            scene_boxes.append([x - pw, y1 - ph, x + pw, y1])
    elif scene == "visit":
        first = spec["people"][0]
        px, tx = first["x"] * w, (spec["landmark"]["x"] if spec.get("landmark") else first["x"]) * w
        d.polygon([(px - 0.25 * u, h), (px + 0.25 * u, h), (tx + 0.06 * u, hz), (tx - 0.06 * u, hz)], fill=v.CARPET)
        scene_boxes.append([min(px - 0.25 * u, tx - 0.06 * u), hz, max(px + 0.25 * u, tx + 0.06 * u), h])

    for person in spec["people"]:
        p = v.PERSON_BY_KEY[person["key"]]
        H, f, x = person["height"] * u, person["foot"] * h, person["x"] * w
        box = _person(d, p, x, f, H)
        placed.append({"signature": f"person:{p.key}", "kind": "person", "name": p.name, "box": box})
        if scene == "flood":  # wading: the water hides the legs
            d.rectangle([x - 0.3 * H, f - 0.24 * H, x + 0.3 * H, f + 1], fill=v.WATER)
            d.line([x - 0.3 * H, f - 0.24 * H, x + 0.3 * H, f - 0.24 * H], fill=v.RIPPLE, width=lw)

    if scene == "speech":  # a lectern with a microphone in front of the first speaker
        first = spec["people"][0]
        H, f, x = first["height"] * u, first["foot"] * h, first["x"] * w
        d.polygon([(x - 0.26 * H, f - 0.44 * H), (x + 0.26 * H, f - 0.44 * H), (x + 0.19 * H, f), (x - 0.19 * H, f)],
                  fill=v.LECTERN)
        d.line([x + 0.16 * H, f - 0.44 * H, x + 0.16 * H, f - 0.5 * H], fill=v.MICROPHONE, width=lw)
        d.ellipse([x + 0.13 * H, f - 0.55 * H, x + 0.19 * H, f - 0.49 * H], fill=v.MICROPHONE)
        scene_boxes.append([x - 0.26 * H, f - 0.44 * H, x + 0.26 * H, f])

    if scene_boxes:
        placed.append({"signature": f"scene:{scene}", "kind": "other", "name": scene, "box": _union(scene_boxes)})
    for s in placed:
        s["box"] = _clip(s["box"], w, h)
    return np.asarray(im), {"size": [w, h], "subjects": placed}
