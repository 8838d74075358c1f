"""Keep the API key out of every message we produce: exception text from a server can echo it."""

from __future__ import annotations

from typing import Iterable

REDACTED = "[redacted]"


class Redactor:
    """Replaces each secret (and its common prefix-stripped form) in text with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        found = set()
        for s in secrets:
            if s and len(s) >= 6:
                found.add(s)
                if s.startswith("Bearer "):
                    found.add(s[len("Bearer "):])
        self._secrets = sorted(found, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        text = str(text)
        for s in self._secrets:
            text = text.replace(s, REDACTED)
        return text
