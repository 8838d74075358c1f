"""Make every subject a span of the caption: exact (case-insensitive) match, else fuzzy, else dropped.

The token weighting locates each subject in the caption, so a phrase the model paraphrased is
either snapped to the closest caption n-gram (difflib ratio >= threshold) or dropped, and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher

DEFAULT_THRESHOLD = 0.85

_WORD = re.compile(r"\w+(?:['’\-&.]\w+)*")
_STRIP = " \t\r\n\"'“”‘’`.,;:!?()[]{}"


@dataclass
class Matched:
    """Subjects as caption spans, with what was snapped (model phrase -> caption span) or dropped."""

    subjects: list[str] = field(default_factory=list)
    fuzzy: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _exact(caption: str, phrase: str) -> str | None:
    words = phrase.split()
    pattern = r"\s+".join(re.escape(w) for w in words)
    if words[0][:1].isalnum() or words[0][:1] == "_":
        pattern = r"(?<!\w)" + pattern
    if words[-1][-1:].isalnum() or words[-1][-1:] == "_":
        pattern = pattern + r"(?!\w)"
    m = re.search(pattern, caption, re.I)
    return m.group(0) if m else None


def _fuzzy(caption: str, phrase: str, threshold: float) -> str | None:
    spans = [(m.start(), m.end()) for m in _WORD.finditer(caption)]
    target = " ".join(phrase.lower().split())
    k = len(target.split())
    best, best_score = None, threshold
    for n in sorted({k, max(1, k - 1), k + 1}, key=lambda n: abs(n - k)):
        for i in range(len(spans) - n + 1):
            start, end = spans[i][0], spans[i + n - 1][1]
            gram = " ".join(caption[start:end].lower().split())
            score = SequenceMatcher(None, target, gram, autojunk=False).ratio()
            if score > best_score or (best is None and score >= best_score):
                best, best_score = caption[start:end], score
    return best


def match_phrases(caption: str, phrases: list[str], *, threshold: float = DEFAULT_THRESHOLD,
                  max_subjects: int | None = None) -> Matched:
    """Caption spans for the model's phrases, deduplicated, in the model's order."""
    out, seen = Matched(), set()
    for raw in phrases:
        phrase = raw.strip(_STRIP)
        if not phrase:
            out.dropped.append(raw)
            continue
        span = _exact(caption, phrase)
        if span is None:
            span = _fuzzy(caption, phrase, threshold)
            if span is None:
                out.dropped.append(raw)
                continue
            out.fuzzy.append((raw, span))
        if span.lower() in seen:
            continue
        seen.add(span.lower())
        out.subjects.append(span)
    if max_subjects is not None:
        out.subjects = out.subjects[:max_subjects]
    return out
