"""What a run did, in numbers: the line a user reads at the end and a test asserts on."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Report:
    backend: str = ""
    model: str = ""
    mode: str = "direct"          # "direct", "batch" or "offline"
    records: int = 0              # input records
    captions: int = 0             # distinct captions among them
    ok: int = 0                   # distinct captions with an answer
    failures: int = 0             # distinct captions without one (not cached: a re-run retries them)
    cache_hits: int = 0           # distinct captions answered from the cache, no request
    requests: int = 0             # HTTP requests sent, retries included
    retries: int = 0              # requests that repeated an earlier one (transient error or bad JSON)
    fuzzy: int = 0                # model phrases snapped to a nearby caption n-gram
    dropped: int = 0              # model phrases not found in the caption
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"subjects ({self.backend}, {self.model}, {self.mode}): {self.captions} captions, {self.ok} ok, "
                f"{self.failures} failed, {self.cache_hits} from cache, {self.requests} requests "
                f"({self.retries} retries), {self.fuzzy} phrases fuzzy-matched, {self.dropped} dropped, "
                f"{self.elapsed_s:.1f} s")
