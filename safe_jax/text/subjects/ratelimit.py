"""Pacing and retry timing for a remote LLM: requests/s, exponential backoff with jitter, Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass
from typing import Mapping


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart (no burst); rate None or <= 0: no limit."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class Backoff:
    """Delay before retry ``attempt`` (0-based): the server's Retry-After if given, else
    ``base * factor**attempt`` capped at ``max_delay``, with "equal jitter" (uniform in [d/2, d])
    so that many clients hit by the same 429 do not come back together."""

    base: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    jitter: bool = True

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after)
        d = min(self.max_delay, self.base * self.factor ** attempt)
        return random.uniform(d / 2, d) if self.jitter else d


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms``, or ``retry-after`` as seconds or an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())
