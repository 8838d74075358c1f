"""Subjects without a network or a model: named-entity and noun-phrase heuristics for news captions.

Candidates, in priority order, each a span of the caption:
1. quoted names and capitalised runs ("Boris Johnson", "Houses of Parliament"), titles stripped,
   dates and photo credits skipped; a proper adjective with its noun ("Olympic rings");
2. noun phrases after a determiner ("a flooded street"), and people nouns anywhere ("photographers").
A possessive name that only describes the next name ("London's mayor Boris Johnson") is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from safe_jax.text.subjects import lexicon as lx

HEURISTIC_VERSION = "offline-v1"

_TOKEN = re.compile(
    r"(?:St|Mr|Mrs|Ms|Dr|Jr|Sr|Mt|Ft|Gen|Lt|Col|Sgt|Capt|Gov|Sen|Rep|Prof|Rev)\.(?=\s+[A-Z])"
    r"|(?:[A-Z]\.){2,}|\w+(?:['’\-&]\w+)*|[^\w\s]")
_QUOTED = re.compile(r"[\"“]([^\"“”]{2,60})[\"”]|(?<!\w)‘([^‘’]{2,60})’(?!\w)")
_CREDIT = re.compile(
    r"\((?=[^()]*\b(?:Photo|Photos|Getty|Reuters|REUTERS|AFP|AP|EPA|Credit|Images|Xinhua|PA)\b)[^()]*\)"
    r"|\b(?:REUTERS|Reuters|AFP|EPA|AP|PA)(?:\s+Photo)?\s*/\s*[A-Z][\w.\-]*(?:\s+[A-Z][\w.\-]*)*"
    r"|\b(?:Photo|Picture|Credit)\s*:\s*[A-Z][\w.\-]*(?:\s+[A-Z][\w.\-]*)*")
_CONNECTORS = frozenset("of de del della di da van von der la le du bin al el y".split())
_POSSESSIVE = ("'s", "’s")


@dataclass
class _Tok:
    text: str
    start: int
    end: int
    sentence_start: bool = False

    @property
    def lower(self) -> str:
        return self.text.lower()

    @property
    def is_word(self) -> bool:
        return self.text[0].isalnum()

    @property
    def is_cap(self) -> bool:
        return self.text[0].isupper()

    @property
    def possessive(self) -> bool:
        return self.text.endswith(_POSSESSIVE)

    @property
    def base_end(self) -> int:
        return self.end - 2 if self.possessive else self.end

    @property
    def base(self) -> str:
        return self.text[:-2] if self.possessive else self.text


def _tokens(caption: str) -> list[_Tok]:
    masked = [(m.start(), m.end()) for m in _CREDIT.finditer(caption)]
    toks, new_sentence = [], True
    for m in _TOKEN.finditer(caption):
        if any(a <= m.start() < b for a, b in masked):
            continue
        tok = _Tok(m.group(), m.start(), m.end(), sentence_start=new_sentence)
        toks.append(tok)
        if tok.is_word:
            new_sentence = False
        elif tok.text in ".!?:;“\"‘(":
            new_sentence = True
    return toks


def _is_demonym(word: str) -> bool:
    w = word.lower()
    return w in lx.DEMONYMS or (len(w) > 4 and w.endswith(lx.DEMONYM_SUFFIXES) and w not in lx.STOP)


def _is_title(tok: "_Tok") -> bool:
    return tok.base.lower().rstrip(".") in lx.TITLES


def _is_people(word: str) -> bool:
    w = word.lower()
    return w in lx.PEOPLE or (len(w) > 5 and w.endswith(lx.AGENT_PLURAL_SUFFIXES) and w not in lx.STOP
                              and w not in lx.ABSTRACT)


def _content(tok: _Tok) -> bool:
    """A lowercase word that can be part of a common noun phrase."""
    return tok.is_word and not tok.is_cap and tok.lower not in lx.STOP and not tok.text.isdigit()


def _cap_runs(toks: list[_Tok]) -> list[tuple[int, int]]:
    """[i, j) token ranges of capitalised words, joined by connectors like 'of'."""
    runs, i = [], 0
    while i < len(toks):
        if toks[i].is_word and toks[i].is_cap and not toks[i].text.isdigit():
            j = i + 1
            while j < len(toks) and (not toks[j - 1].possessive or toks[j].lower in lx.LANDMARKS):
                if toks[j].is_word and toks[j].is_cap:
                    j += 1
                elif (toks[j].lower in _CONNECTORS and j + 1 < len(toks) and toks[j + 1].is_word
                      and toks[j + 1].is_cap and not toks[j].is_cap):
                    j += 2
                else:
                    break
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


class _Candidates:
    def __init__(self, caption: str):
        self.caption = caption
        self.items: list[tuple[int, int, int]] = []  # (priority, start, end)

    def add(self, priority: int, start: int, end: int) -> None:
        if end > start:
            self.items.append((priority, start, end))

    def select(self, limit: int | None) -> list[str]:
        taken: list[tuple[int, int, int]] = []
        for p, s, e in sorted(self.items, key=lambda c: (c[0], c[1])):
            if all(e <= ts or s >= te for _, ts, te in taken):
                taken.append((p, s, e))
        taken.sort(key=lambda c: (0 if c[0] <= 1 else 1, c[1]))
        out, seen = [], set()
        for _, s, e in taken:
            text = self.caption[s:e]
            if text.lower() not in seen:
                seen.add(text.lower())
                out.append(text)
        return out[:limit] if limit else out


def _names(toks: list[_Tok], cands: _Candidates) -> None:
    for i, j in _cap_runs(toks):
        words = toks[i:j]
        # Leading function words ("The", "In") and dates/credits are not part of a name.
        while words and (words[0].lower in lx.STOP or words[0].base.lower() in lx.DATES | lx.CREDITS):
            words = words[1:]
        if not words:
            continue
        if len(words) > 1 and words[0].sentence_start and _is_people(words[0].text):
            cands.add(2, words[0].start, words[0].base_end)
            words = words[1:]
            while words and words[0].lower in _CONNECTORS:
                words = words[1:]
            if not words:
                continue
        if all(w.base.lower() in lx.DATES | lx.CREDITS or w.lower in _CONNECTORS for w in words):
            continue
        if len(words) == 1 and len(words[0].base) < 2:
            continue
        nxt = toks[j] if j < len(toks) else None
        # "London's mayor Boris Johnson", "Britain's Andy Murray": the possessive describes the name.
        if words[-1].possessive:
            k = j
            while k < len(toks) and k - j < 3 and _content(toks[k]):
                k += 1
            if k < len(toks) and toks[k].is_word and toks[k].is_cap:
                continue
        titled = list(words)
        while len(titled) > 1 and (_is_title(titled[0]) or (_is_demonym(titled[0].text) and _is_title(titled[1]))):
            titled = titled[1:]
        if all(_is_title(w) for w in titled):
            titled = list(words)
        if len(titled) > 1 or titled[0] is not words[0]:
            words = titled
        start, end = words[0].start, words[-1].base_end
        if len(words) == 1:
            w = words[0]
            # A proper adjective with its noun: "the Olympic rings", "Italian police".
            if _is_demonym(w.text) and not w.possessive:
                k = j
                if k < len(toks) and _content(toks[k]) and toks[k].lower not in lx.VERBS:
                    k += 1
                    if k < len(toks) and _content(toks[k]) and _is_people(toks[k].text):
                        k += 1
                if k > j:
                    cands.add(1, start, toks[k - 1].base_end)
                    continue
                if w.lower in lx.DEMONYMS:
                    continue  # "British" alone is an adjective; "Delhi" alone is a name
            # A sentence-initial capital may be an ordinary noun: "Firefighters at ...", "Police officers".
            if w.sentence_start and (w.lower in lx.STOP or w.lower in lx.VERBS):
                continue
            if w.sentence_start and (_is_people(w.text) or (nxt is not None and _content(nxt) and _is_people(nxt.text))):
                end_tok = nxt if (nxt is not None and _content(nxt) and _is_people(nxt.text)) else w
                cands.add(2, start, end_tok.base_end)
                continue
        cands.add(1, start, end)


def _quoted(caption: str, cands: _Candidates) -> None:
    for m in _QUOTED.finditer(caption):
        g = 1 if m.group(1) is not None else 2
        text = m.group(g)
        if len(text.split()) <= 6 and text.strip()[:1].isupper():
            cands.add(1, m.start(g), m.end(g))


def _noun_phrases(toks: list[_Tok], cands: _Candidates) -> None:
    for i, det in enumerate(toks):
        if det.lower not in lx.DETERMINERS:
            continue
        k = i + 1
        while k < len(toks) and toks[k].text.isdigit():
            k += 1
        words: list[_Tok] = []
        while k < len(toks) and _content(toks[k]) and len(words) < 4:
            w = toks[k]
            if words and (w.lower in lx.VERBS or w.lower.endswith(("ed", "ing")) and w.lower not in lx.ING_NOUNS):
                break
            if w.lower.endswith("ly") and len(w.lower) > 4 and w.lower not in lx.LY_NOUNS:
                break
            if (words and det.lower in lx.SINGULAR_DETERMINERS and w.lower.endswith("s")
                    and not w.lower.endswith(("ss", "us", "is"))):
                break  # "a woman walks": a singular noun followed by a verb
            words.append(w)
            k += 1
            if w.possessive:
                break
        if not words:
            continue
        if k < len(toks) and toks[k].is_word and toks[k].is_cap:
            continue  # "the mayor Boris Johnson": a title before a name
        while len(words) > 1 and words[0].lower in lx.WEAK_ADJECTIVES:
            words = words[1:]
        head = words[-1].base.lower()
        if head in lx.ABSTRACT or head in lx.WEAK_ADJECTIVES or head in lx.TITLES:
            continue
        if head.endswith("ing") and head not in lx.ING_NOUNS:
            continue
        if len(words) == 1 and words[0].lower.endswith("ed"):
            continue
        cands.add(2, words[-3:][0].start, words[-1].base_end)


def _people(toks: list[_Tok], cands: _Candidates) -> None:
    for t in toks:
        if _content(t) and not t.possessive and _is_people(t.text):
            cands.add(3, t.start, t.base_end)


def offline_subjects(caption: str, max_subjects: int | None = 6) -> list[str]:
    """Key subjects of one caption, each a verbatim span of it: names first, then common nouns."""
    toks = _tokens(caption)
    cands = _Candidates(caption)
    _quoted(caption, cands)
    _names(toks, cands)
    _noun_phrases(toks, cands)
    _people(toks, cands)
    return cands.select(max_subjects)
