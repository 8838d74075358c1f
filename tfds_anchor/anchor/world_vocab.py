"""The vocabulary of the synthetic news world: who and what can be in a picture, and how each looks.

Every subject has one visual signature that survives being drawn at 64×64 and then blurred by a
tiny model: a person is a figure with a shirt colour no one else wears (and a hat or hair of
their own), a landmark a building silhouette in a stone colour of its own, a city the colour of
its sky, a scene a large region of its own colour (water, pitch, flames, placards, a lectern, a
carpet). Colours that meet in the same part of a picture (skies and stones above the horizon,
shirts, skins and scene colours below it) stay about 50 or more apart in RGB, which is what
lets a nearest-colour detector tell them apart after blur and noise. The vocabulary is small on
purpose: tiny models trained for minutes must learn it.

Add entries rather than edit them: an edit changes every picture drawn with the entry, and its
key is the signature id stored with built datasets.
"""

from __future__ import annotations

import dataclasses
import re

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Person:
    key: str
    name: str
    shirt: RGB
    skin: RGB
    hat: str      # a hat or hair style drawn by world_draw
    hat_colour: RGB


@dataclasses.dataclass(frozen=True)
class Landmark:
    key: str
    name: str     # as the caption writes it (lower-case article: "the cathedral")
    shape: str    # a silhouette drawn by world_draw
    colour: RGB
    aspect: float  # width / height of the silhouette


@dataclasses.dataclass(frozen=True)
class City:
    key: str
    name: str
    sky: RGB


@dataclasses.dataclass(frozen=True)
class Scene:
    key: str
    phrases: tuple[str, ...]   # caption spans that name what the scene draws (kind "other")


SKIN_LIGHT, SKIN_MEDIUM, SKIN_DARK = (240, 200, 165), (205, 150, 110), (135, 90, 60)
SKINS = (SKIN_LIGHT, SKIN_MEDIUM, SKIN_DARK)

PEOPLE = (
    Person("okafor", "Maria Okafor", (215, 35, 45), SKIN_DARK, "bun", (30, 25, 25)),
    Person("whitfield", "James Whitfield", (40, 70, 215), SKIN_LIGHT, "top_hat", (25, 25, 30)),
    Person("raman", "Priya Raman", (125, 45, 175), SKIN_MEDIUM, "long_hair", (30, 25, 25)),
    Person("nowak", "Tomasz Nowak", (35, 195, 215), SKIN_LIGHT, "cap", (215, 35, 45)),
    Person("duarte", "Elena Duarte", (230, 60, 170), SKIN_MEDIUM, "beret", (40, 40, 45)),
    Person("achebe", "Samuel Achebe", (150, 215, 40), SKIN_DARK, "bald", (0, 0, 0)),
    Person("lindqvist", "Hannah Lindqvist", (0, 125, 120), SKIN_LIGHT, "long_hair", (235, 205, 110)),
    Person("morita", "Kenji Morita", (140, 150, 0), SKIN_MEDIUM, "helmet", (250, 250, 250)),
)

LANDMARKS = (
    Landmark("bridge", "the old bridge", "bridge", (70, 85, 125), 1.5),
    Landmark("cathedral", "the cathedral", "spire", (170, 140, 90), 0.75),
    Landmark("city_hall", "City Hall", "dome", (70, 140, 110), 1.1),
    Landmark("clock_tower", "the clock tower", "clock_tower", (180, 90, 40), 0.55),
    Landmark("high_court", "the High Court", "temple", (185, 190, 210), 1.3),
    Landmark("station", "the central station", "arch", (55, 55, 62), 1.5),
)

CITIES = (
    City("london", "London", (150, 160, 175)),
    City("new_york", "New York", (100, 165, 235)),
    City("glasgow", "Glasgow", (165, 135, 225)),
    City("houston", "Houston", (245, 205, 100)),
    City("cardiff", "Cardiff", (250, 130, 110)),
    City("boston", "Boston", (140, 215, 195)),
    City("chicago", "Chicago", (235, 150, 205)),
)

SCENES = (
    Scene("protest", ("protesters", "Protesters", "a rally", "placards")),
    Scene("flood", ("flood water", "Flood water", "floodwater")),
    Scene("fire", ("a blaze", "A blaze", "a fire", "A fire")),
    Scene("match", ("the pitch",)),
    Scene("speech", ("a press conference", "a lectern")),
    Scene("visit", ("the red carpet", "a red carpet")),
)

# The colours each scene draws (its signature) and the other colours of the world.
WATER, RIPPLE = (55, 90, 140), (125, 155, 195)
PITCH, LINE = (55, 145, 55), (240, 240, 240)
FLAME, FLAME_CORE, SMOKE, WAREHOUSE = (250, 115, 20), (255, 200, 45), (95, 95, 100), (80, 72, 68)
PLACARD, PLACARD_TEXT, STICK = (245, 245, 240), (40, 40, 45), (40, 40, 45)
LECTERN, MICROPHONE = (115, 70, 35), (20, 20, 20)
CARPET = (125, 15, 75)
TROUSERS = (50, 50, 60)
CLOCK_FACE = (245, 240, 220)
PAVEMENT = (118, 118, 122)
CROWD = ((100, 100, 112), (122, 102, 84), (86, 96, 80), (112, 90, 102))

ROLES = ("mayor", "health secretary", "opposition leader", "union leader", "foreign minister", "coach",
         "chief executive", "fire chief", "transport secretary", "council leader")
EVENTS = ("a budget vote", "the strike talks", "a summit on housing", "the inquiry's first hearing",
          "a televised debate", "the election count", "the spending review")
CAUSES = ("lower rents", "higher pay for nurses", "cleaner rivers", "cheaper buses", "safer streets")
STORMS = ("Storm Ciara", "Storm Dennis", "Hurricane Ida", "Storm Babet")
TEAMS = ("their rivals", "the league leaders", "a side from the north", "the holders")

PERSON_BY_KEY = {p.key: p for p in PEOPLE}
LANDMARK_BY_KEY = {m.key: m for m in LANDMARKS}
CITY_BY_KEY = {c.key: c for c in CITIES}
SCENE_KEYS = tuple(s.key for s in SCENES)


def pavement(city: City) -> RGB:
    """The ground of a street scene, tinted a little by the city's sky so a city reads in the ground too."""
    return tuple(int(round(0.8 * p + 0.2 * s)) for p, s in zip(PAVEMENT, city.sky))  # type: ignore[return-value]


def _norm(text: str) -> str:
    text = " ".join(re.sub(r"[^\w' ]", " ", text.lower()).split())
    return text[4:] if text.startswith("the ") else text


def _lookup() -> dict[str, str]:
    table: dict[str, str] = {}
    for p in PEOPLE:
        table[_norm(p.name)] = f"person:{p.key}"
        table[_norm(p.name.split()[-1])] = f"person:{p.key}"
    for m in LANDMARKS:
        table[_norm(m.name)] = f"landmark:{m.key}"
    for c in CITIES:
        table[_norm(c.name)] = f"city:{c.key}"
    for s in SCENES:
        for phrase in s.phrases:
            table[_norm(phrase)] = f"scene:{s.key}"
    return table


_LOOKUP = _lookup()


def signature_of(text: str) -> str | None:
    """The signature id ("person:okafor", "landmark:dome", "city:london", "scene:flood") a subject's text
    names, or None for a subject the world does not draw. Case, a leading "the" and a possessive
    "'s" do not matter, and a person may be named by surname alone."""
    key = _norm(text)
    if key.endswith("'s"):
        key = key[:-2]
    return _LOOKUP.get(key)


def kind_of(signature: str) -> str:
    """The subject kind of a signature: person, place (landmarks and cities) or other (scenes)."""
    return {"person": "person", "landmark": "place", "city": "place", "scene": "other"}[signature.split(":")[0]]
