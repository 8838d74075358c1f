"""The synthetic news world: scene specs and their captions, for pretraining and measuring grounding.

A spec says who is where during what (one or two named people, usually a landmark, always a city
and a scene type); ``world_draw.draw`` turns it into a picture whose every subject has a visual
signature, and ``caption`` into an abstractive caption in ANCHOR's style whose subjects are
verbatim spans with kinds. So a model trained on the world can be judged on whether the subjects a
caption names are really in the picture it draws (``world_detect``). Everything depends on the
generator passed in, so the same seed gives the same specs, captions and pictures everywhere.

The vocabulary is small (see ``world_vocab``) but the combinations are many; ``combination_split``
puts each combination of scene, people, landmark and city in one split only, so that held-out
captions name combinations never seen in training while every single subject was.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from tfds_anchor.anchor import world_vocab as v
from tfds_anchor.anchor.world_draw import draw  # noqa: F401  (part of this module's API)

# Held-out share of combinations, in percent, as the builder's hash split.
_TRAIN_PERCENT, _VALIDATION_PERCENT = 90, 5

# {who}: the people, first in the sentence; {whom}: the people as an object; {where:prep}: the
# landmark (if any) and the city; [phrase]: what the scene draws; <singular|plural>: a verb.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "protest": (
        "{who} <joins|join> [protesters] {where:outside} to demand {cause}, a day before {event}.",
        "[Protesters] greet {whom} {where:outside} with calls for {cause}.",
        "{who} <speaks|speak> to [a rally] {where:outside} as the campaign for {cause} grows.",
    ),
    "flood": (
        "{who} <wades|wade> through [flood water] {where:near} after {storm} swept across the region overnight.",
        "{who} <visits|visit> residents {where:near} as [flood water] rises after {storm}.",
        "[Flood water] surrounds {whom} {where:near} on the second day of {storm}.",
    ),
    "fire": (
        "{who} <watches|watch> firefighters tackle [a blaze] {where:near}; no one was hurt, officials said.",
        "[A blaze] at a warehouse {where:near} draws {whom} to the scene on {day}.",
        "{who} <visits|visit> the site of [a fire] {where:near} that forced hundreds from their homes.",
    ),
    "match": (
        "{who} <celebrates|celebrate> on [the pitch] {where:near} after a late winner against {team}.",
        "{who} <walks|walk> onto [the pitch] {where:near} before the final against {team}.",
    ),
    "speech": (
        "{who} <holds|hold> [a press conference] {where:outside} after {event}.",
        "{who} <speaks|speak> to reporters {where:at} ahead of {event}.",
        "{who} <addresses|address> the media from [a lectern] {where:outside} on the eve of {event}.",
    ),
    "visit": (
        "{who} <arrives|arrive> on [the red carpet] {where:at} for {event}.",
        "{who} <is|are> welcomed {where:at} during a tour of the region.",
        "{who} <walks|walk> along [a red carpet] {where:at} on the first day of a state visit.",
    ),
}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TOKEN = re.compile(r"\{(\w+)(?::(\w+))?\}|\[([^\]]+)\]|<([^|>]+)\|([^>]+)>")


def _pick(rng: np.random.Generator, xs):
    return xs[int(rng.integers(len(xs)))]


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """A random spec (JSON-serialisable): positions are fractions of the width and height, sizes
    fractions of the shorter side, so that it draws the same scene at any size."""
    scene = _pick(rng, v.SCENE_KEYS)
    city = _pick(rng, v.CITIES).key
    spec: dict[str, Any] = {"scene": scene, "city": city, "horizon": round(0.56 + 0.04 * float(rng.random()), 4)}
    side = -1 if rng.random() < 0.5 else 1  # where the landmark stands; a fire burns on the other side
    if rng.random() < 0.85:
        m = _pick(rng, v.LANDMARKS)
        height = 0.34 + 0.08 * float(rng.random())
        half = m.aspect * height / 2
        lo, hi = half + 0.02, 1 - half - 0.02
        if scene == "fire":
            lo, hi = (lo, max(lo, 0.45)) if side < 0 else (min(hi, 0.55), hi)
        spec["landmark"] = {"key": m.key, "x": round(lo + (hi - lo) * float(rng.random()), 4),
                            "height": round(height, 4)}
    else:
        spec["landmark"] = None
    if scene == "fire":
        spec["fire_x"] = round((0.72 if side < 0 else 0.2) + 0.08 * float(rng.random()), 4)
    count = 2 if rng.random() < 0.25 else 1
    keys = rng.choice(len(v.PEOPLE), size=count, replace=False)
    lm = spec["landmark"]
    # Half the landmark's width (as a fraction of a square picture's), to keep its middle in view.
    lm_half = v.LANDMARK_BY_KEY[lm["key"]].aspect * lm["height"] / 2 if lm else 0.0
    people: list[dict[str, Any]] = []
    for k in keys:
        height = 0.36 + 0.1 * float(rng.random())
        half = 0.25 * height
        for attempt in range(60):  # two people never overlap, even in a square picture
            x = half + 0.02 + (1 - 2 * half - 0.04) * float(rng.random())
            apart = all(abs(x - q["x"]) >= 0.25 * (height + q["height"]) + 0.04 for q in people)
            clear = not lm or abs(x - lm["x"]) >= 0.6 * lm_half + 0.5 * half or attempt >= 40
            if apart and clear:
                break
        else:
            continue
        people.append({"key": v.PEOPLE[int(k)].key, "x": round(x, 4), "height": round(height, 4),
                       "foot": round(0.86 + 0.1 * float(rng.random()), 4)})
    spec["people"] = people
    spec["details"] = int(rng.integers(2**31))
    return spec


def caption(spec: dict[str, Any], rng: np.random.Generator) -> tuple[str, list[dict[str, Any]]]:
    """An abstractive caption of ``spec`` and its subjects, in order of appearance: ``{"text",
    "kind", "signature", "start", "end"}`` with ``caption[start:end] == text``.

    Kinds are person, place (landmarks, cities) and other (what the scene draws). Like ANCHOR's
    captions it says who, where and why and little of what is seen; every subject it names is
    drawn, and everything drawn that carries a signature is named, except a scene some templates
    leave unnamed (a speech to reporters, a welcome)."""
    people = [v.PERSON_BY_KEY[p["key"]] for p in spec["people"]]
    plural = len(people) > 1
    role = _pick(rng, v.ROLES)
    title = role.title()
    form = int(rng.integers(3))
    city = v.CITY_BY_KEY[spec["city"]]
    landmark = v.LANDMARK_BY_KEY[spec["landmark"]["key"]] if spec.get("landmark") else None
    fillers = {"event": _pick(rng, v.EVENTS), "cause": _pick(rng, v.CAUSES), "storm": _pick(rng, v.STORMS),
               "team": _pick(rng, v.TEAMS), "day": _pick(rng, DAYS)}
    template = _pick(rng, TEMPLATES[spec["scene"]])

    out: list[str] = []
    subjects: list[dict[str, Any]] = []
    at = 0

    def put(text: str, signature: str | None = None) -> None:
        nonlocal at
        if signature is not None:
            subjects.append({"text": text, "kind": v.kind_of(signature), "signature": signature,
                             "start": at, "end": at + len(text)})
        out.append(text)
        at += len(text)

    def names(subject_position: bool) -> None:
        first = people[0]
        if plural:
            put(first.name, f"person:{first.key}")
            put(" and ")
            put(people[1].name, f"person:{people[1].key}")
        elif subject_position and form == 0:
            put(first.name, f"person:{first.key}")
            put(f", the {role},")
        elif form == 1:
            put(f"{title} ")
            put(first.name, f"person:{first.key}")
        else:
            put(first.name, f"person:{first.key}")

    pos = 0
    for match in _TOKEN.finditer(template):
        put(template[pos:match.start()])
        pos = match.end()
        field, arg, phrase, singular, plural_form = match.groups()
        if phrase is not None:
            put(phrase, f"scene:{spec['scene']}")
        elif singular is not None:
            put(plural_form if plural else singular)
        elif field in ("who", "whom"):
            names(field == "who")
        elif field == "where":
            if landmark is not None:
                put(f"{arg} ")
                put(landmark.name, f"landmark:{landmark.key}")
                put(" in ")
            else:
                put("in ")
            put(city.name, f"city:{city.key}")
        else:
            put(fillers[field])
    put(template[pos:])
    return "".join(out), subjects


def combination(spec: dict[str, Any]) -> str:
    """What a caption says, without its wording: scene, people, landmark, city."""
    people = "+".join(sorted(p["key"] for p in spec["people"]))
    landmark = spec["landmark"]["key"] if spec.get("landmark") else "-"
    return f"{spec['scene']}|{people}|{landmark}|{spec['city']}"


def combination_split(spec: dict[str, Any]) -> str:
    """train, validation or test by a hash of the spec's combination, so that a combination seen in
    one split is never seen in another."""
    digest = hashlib.sha256(combination(spec).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < _TRAIN_PERCENT:
        return "train"
    return "validation" if bucket < _TRAIN_PERCENT + _VALIDATION_PERCENT else "test"


def example(seed: int, index: int, size: int | tuple[int, int] = 64) -> dict[str, Any]:
    """One picture of the world with everything known about it, from (seed, index) alone.

    For pretraining loops that want pictures by index (any order, any worker) rather than a stream.
    """
    rng = np.random.default_rng([seed, index])
    spec = sample_scene(rng)
    text, subjects = caption(spec, rng)
    image, truth = draw(spec, size)
    return {"image": image, "caption": text, "subjects": subjects, "truth": truth, "spec": spec,
            "split": combination_split(spec)}
