"""The news organisations of ANCHOR as one ClassLabel, and the spellings that map onto it."""

from __future__ import annotations

import re

# ClassLabel names, in id order. Never reorder: the ids are stored in built datasets.
SOURCES = ("the_guardian", "bbc", "usa_today", "washington_post", "new_york_times", "other")

_ALIASES = {
    "the_guardian": ("guardian", "the guardian", "theguardian", "guardian.co.uk", "theguardian.com"),
    "bbc": ("bbc", "bbc news", "bbc.co.uk", "bbc.com"),
    "usa_today": ("usa today", "usatoday", "usa_today", "usatoday.com"),
    "washington_post": ("washington post", "the washington post", "washingtonpost", "washpost", "wapo",
                        "washingtonpost.com"),
    "new_york_times": ("new york times", "the new york times", "nytimes", "nyt", "ny times", "nytimes.com",
                       "goodnews", "nytimes800k"),
}
_LOOKUP = {re.sub(r"[\s_\-]+", " ", alias): name for name, aliases in _ALIASES.items() for alias in aliases}
_LOOKUP.update({name.replace("_", " "): name for name in SOURCES})


def normalise_source(value: object) -> str:
    """A ClassLabel name for any spelling of a source ("The Guardian", "nyt", ...); unknown → "other".

    An unknown source is kept as "other" rather than skipped: the record itself is good.
    """
    if not isinstance(value, str):
        return "other"
    key = re.sub(r"[\s_\-]+", " ", value.strip().lower())
    return _LOOKUP.get(key, "other")
