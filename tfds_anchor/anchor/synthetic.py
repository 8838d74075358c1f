"""The ``sample`` config: news-like image–caption pairs drawn by our own code, offline and seeded.

Each pair is a scene type (a protest, a flood, a fire, a speech, a match, a visit) drawn as a
simple picture (sky, street, buildings, people, water, flames, banners) and an abstractive
caption in the style of ANCHOR: who, where and why, few visual words, with the named subjects
known by construction. Names of people are invented. Everything depends on the seed alone, so the
built dataset is the same on every machine.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from tfds_anchor.anchor.records import Record, hash_split
from tfds_anchor.anchor.sources import SOURCES

PEOPLE = ("Maria Okafor", "James Whitfield", "Priya Raman", "Tomasz Nowak", "Elena Duarte", "Samuel Achebe",
          "Hannah Lindqvist", "Kenji Morita", "Grace O'Neill", "Omar Haddad", "Lucia Bianchi", "David Mensah")
ROLES = ("mayor", "health secretary", "opposition leader", "union leader", "foreign minister", "coach",
         "chief executive", "fire chief")
CITIES = ("London", "Leeds", "Glasgow", "Manchester", "Cardiff", "Belfast", "Bristol", "New York", "Chicago",
          "Houston", "Washington", "Boston")
LANDMARKS = ("Tower Bridge", "the town hall", "Parliament Square", "the High Court", "City Hall",
             "the Capitol", "the central station", "the old cathedral")
TEAMS = ("Leeds United", "Glasgow Rangers", "Chicago Fire", "Boston Harbor FC", "Cardiff City", "Houston Dynamo")
EVENTS = ("a budget vote", "the strike talks", "a summit on housing", "the inquiry's first hearing",
          "a televised debate", "the election count")
STORMS = ("Storm Ciara", "Storm Dennis", "Hurricane Ida", "Storm Babet")

SCENES = ("protest", "flood", "fire", "speech", "match", "visit")


def _caption(scene: str, rng: np.random.Generator) -> tuple[str, list[str], str]:
    """(caption, subjects, the person named or "")."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    person, role, city, landmark = pick(PEOPLE), pick(ROLES), pick(CITIES), pick(LANDMARKS)
    if scene == "protest":
        cause = pick(("lower rents", "higher pay for nurses", "cleaner rivers", "cheaper buses"))
        return (f"Protesters gather outside {landmark} in {city} to demand {cause}, a day before {pick(EVENTS)}.",
                ["Protesters", landmark, city], "")
    if scene == "flood":
        storm = pick(STORMS)
        return (f"Residents wade through flood water in {city} after {storm} swept across the region overnight.",
                ["Residents", "flood water", city], "")
    if scene == "fire":
        return (f"Firefighters battle a blaze at a warehouse near {landmark} in {city}; no one was hurt, "
                f"the {role} said.", ["Firefighters", "a blaze", "a warehouse", landmark], "")
    if scene == "speech":
        return (f"{city}'s {role} {person} speaks to reporters at {landmark} after {pick(EVENTS)}.",
                [person, "reporters", landmark], person)
    if scene == "match":
        team = pick(TEAMS)
        return (f"{team} players celebrate in front of their fans in {city} after a late winner.",
                [f"{team} players", "their fans"], "")
    return (f"{person}, the {role}, visits a primary school in {city} during a tour of the region.",
            [person, "a primary school", city], person)


def _draw(scene: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    u = lambda: float(rng.random())
    horizon = int(h * (0.45 + 0.2 * u()))
    sky = np.array([120 + 80 * u(), 150 + 70 * u(), 200 + 55 * u()])
    ground = np.array([90 + 60 * u(), 90 + 50 * u(), 90 + 40 * u()])
    rows = np.linspace(0.0, 1.0, h)[:, None, None]
    top = sky * (0.75 + 0.25 * rows) * (rows * h < horizon)
    bottom = ground * (0.8 + 0.2 * rows) * (rows * h >= horizon)
    base = np.broadcast_to(top + bottom, (h, w, 3))
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    x = 0
    while x < w:  # a street of buildings with windows
        bw, bh = int(w * (0.08 + 0.12 * u())), int(horizon * (0.3 + 0.6 * u()))
        colour = tuple(int(c) for c in rng.integers(60, 200, 3))
        d.rectangle([x, horizon - bh, x + bw, horizon], fill=colour)
        for wy in range(horizon - bh + 4, horizon - 6, max(6, h // 20)):
            for wx in range(x + 3, x + bw - 4, max(6, w // 30)):
                d.rectangle([wx, wy, wx + max(2, w // 90), wy + max(2, h // 60)], fill=(230, 220, 150) if u() < 0.4 else (40, 50, 60))
        x += bw + int(rng.integers(0, max(2, w // 40)))
    if scene == "flood":
        d.rectangle([0, int(horizon * 1.05), w, h], fill=(70, 90, 120))
        for _ in range(12):
            y = int(horizon * 1.05 + (h - horizon) * u())
            d.line([int(w * u()), y, int(w * u()), y], fill=(150, 170, 200), width=max(1, h // 120))
    if scene == "fire":
        for _ in range(6):
            cx, cy = w * (0.3 + 0.4 * u()), horizon * (0.6 + 0.4 * u())
            r = h * (0.08 + 0.1 * u())
            d.polygon([(cx - r, cy), (cx, cy - 2.5 * r), (cx + r, cy)], fill=(240, int(90 + 100 * u()), 20))
    people = {"protest": 14, "match": 18, "speech": 4, "visit": 5, "flood": 4, "fire": 3}[scene]
    for _ in range(people):  # heads and bodies, nearer ones larger
        depth = u()
        ph = h * (0.12 + 0.25 * depth)
        px, py = w * u(), horizon + (h - horizon) * (0.2 + 0.7 * depth)
        body = tuple(int(c) for c in rng.integers(20, 230, 3))
        d.rectangle([px - ph * 0.18, py - ph * 0.75, px + ph * 0.18, py], fill=body)
        d.ellipse([px - ph * 0.12, py - ph, px + ph * 0.12, py - ph * 0.76], fill=(224, 172, 105) if u() < 0.5 else (141, 85, 36))
    if scene == "protest":
        for _ in range(4):
            bx, by = w * u(), horizon * (0.9 + 0.2 * u())
            d.rectangle([bx, by, bx + w * 0.12, by + h * 0.07], fill=(250, 250, 240), outline=(200, 30, 30), width=2)
    if scene in ("speech", "visit"):
        d.rectangle([w * 0.42, horizon, w * 0.58, horizon + h * 0.2], fill=(60, 40, 30))  # a lectern / desk
    pixels = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (h, w, 1)).astype(np.int16)  # film grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def pairs(n: int, seed: int = 0, size: tuple[int, int] = (192, 128), quality: int = 90) -> Iterator[Record]:
    """``n`` synthetic records with JPEG bytes in ``image_bytes``; one in five is portrait."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = SCENES[int(rng.integers(len(SCENES)))]
        caption, subjects, person = _caption(scene, rng)
        w, h = size if i % 5 else size[::-1]
        buf = io.BytesIO()
        _draw(scene, rng, (w, h)).save(buf, format="JPEG", quality=quality)
        record_id = f"sample-{seed}-{i:05d}"
        yield Record(id=record_id, caption=caption, source=SOURCES[i % 5], image=None, subjects=subjects,
                     entity=person, split=hash_split(record_id), image_bytes=buf.getvalue())


def write_manual_dir(path: epath.PathLike, n: int, *, seed: int = 0, size: tuple[int, int] = (192, 128),
                     quality: int = 90, subjects: bool = False, entities: bool = True) -> list[dict]:
    """A manual directory (``anchor.jsonl`` + ``images/``) of synthetic records, for tests and benchmarks.

    ``subjects=False`` leaves subjects out (as in a directory ``safe-jax subjects`` has not yet run
    over); ``entities=False`` leaves out ``entity`` so that every record belongs to the default
    (non-entity) config.
    Returns the rows written.
    """
    root = epath.Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in pairs(n, seed, size, quality):
        name = f"images/{r.id}.jpg"
        (root / name).write_bytes(r.image_bytes)
        row = {"id": r.id, "caption": r.caption, "source": r.source, "image": name}
        if subjects:
            row["subjects"] = r.subjects
        if r.entity and entities:
            row["entity"] = r.entity
        rows.append(row)
    (root / "anchor.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows
