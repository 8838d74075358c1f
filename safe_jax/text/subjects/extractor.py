"""SubjectExtractor: captions in, subjects (verbatim caption spans) out, with a report.

Backends: "openai" (any OpenAI-compatible endpoint: OpenAI, vLLM, Ollama, llama.cpp's server; key
and URL from OPENAI_API_KEY / OPENAI_BASE_URL or arguments), "offline" (heuristics, no network),
and "auto" (openai when a key is set, else offline). Remote answers go through the SQLite cache,
one commit per answer, so re-runs and crash restarts only ask for what is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from safe_jax.errors import SafeJaxError
from safe_jax.text.subjects import llm_prompt
from safe_jax.text.subjects.batch import BatchSettings, run_batches
from safe_jax.text.subjects.cache import SubjectCache, answer_key, default_cache_path
from safe_jax.text.subjects.extraction_report import Report
from safe_jax.text.subjects.offline import HEURISTIC_VERSION, offline_subjects
from safe_jax.text.subjects.online import DirectSettings, ServiceError, ask_all
from safe_jax.text.subjects.ratelimit import Backoff
from safe_jax.text.subjects.redact import Redactor
from safe_jax.text.subjects.validate import DEFAULT_THRESHOLD, match_phrases

log = logging.getLogger("safe_jax.text.subjects")

DEFAULT_MODEL = "gpt-4o-mini"
BACKENDS = ("auto", "openai", "offline")
NO_KEY = "no-key"  # what local servers (vLLM, Ollama, llama.cpp) get when no key is set


@dataclass
class Record:
    id: Any
    caption: str


@dataclass
class SubjectResult:
    id: Any
    caption: str
    subjects: list[str]
    error: str | None = None           # why this caption has no answer (it was not cached)
    cached: bool = False
    fuzzy: list[tuple[str, str]] = field(default_factory=list)   # (model phrase, caption span)
    dropped: list[str] = field(default_factory=list)             # model phrases not in the caption

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Extraction:
    results: list[SubjectResult]
    report: Report

    def __iter__(self):  # results, report = extractor.run(...)
        return iter((self.results, self.report))


def resolve_backend(backend: str, api_key: str | None = None) -> str:
    if backend not in BACKENDS:
        raise SafeJaxError(f"unknown subjects backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "openai" if (api_key or os.environ.get("OPENAI_API_KEY")) else "offline"
    return backend


def _records(records: Iterable[Record | Mapping[str, Any] | str]) -> list[Record]:
    out = []
    for i, r in enumerate(records):
        if isinstance(r, Record):
            rec = r
        elif isinstance(r, str):
            rec = Record(i, r)
        elif isinstance(r, Mapping):
            if "caption" not in r:
                raise SafeJaxError(f"record {i} has no 'caption'")
            rec = Record(r.get("id", i), r["caption"])
        else:
            raise SafeJaxError(f"record {i} is a {type(r).__name__}; expected a caption string or a mapping")
        if not isinstance(rec.caption, str):
            raise SafeJaxError(f"record {i}: caption must be a string, not {type(rec.caption).__name__}")
        out.append(rec)
    return out


@dataclass
class SubjectExtractor:
    """Configured once, run on any number of records. ``run`` returns results and a Report."""

    backend: str = "auto"
    model: str | None = None
    api_key: str | None = None         # default: OPENAI_API_KEY; never logged, cached or written
    base_url: str | None = None        # default: OPENAI_BASE_URL, else OpenAI
    cache_path: str | Path | None = None  # default: $XDG_CACHE_HOME/safe_jax/subjects.sqlite
    use_cache: bool = True
    batch_api: bool = False
    concurrency: int = 16
    rate: float | None = 10.0          # requests started per second; None or 0: unlimited
    max_retries: int = 6               # per caption, for 429 / 5xx / timeouts / connection errors
    json_retries: int = 2              # extra asks after a malformed answer
    timeout: float = 60.0              # seconds per request
    backoff: Backoff = field(default_factory=Backoff)
    poll_interval: float = 30.0        # Batch API
    batch_workdir: str | Path | None = None
    max_subjects: int = 6
    fuzzy_threshold: float = DEFAULT_THRESHOLD
    temperature: float | None = 0.0    # None: leave it to the server (some reasoning models refuse 0)
    response_format: str = "json_schema"  # or "json_object" / "none" for servers without schemas
    max_consecutive_failures: int = 50
    progress: bool | None = None       # None: a bar only on a terminal

    def __post_init__(self) -> None:
        self._key = self.api_key or os.environ.get("OPENAI_API_KEY") or None
        self.backend = resolve_backend(self.backend, self._key)
        if self.response_format not in llm_prompt.RESPONSE_FORMATS:
            raise SafeJaxError(f"response_format must be one of {', '.join(llm_prompt.RESPONSE_FORMATS)}")
        if self.concurrency < 1:
            raise SafeJaxError("concurrency must be at least 1")
        if self.model is None:
            self.model = DEFAULT_MODEL if self.backend == "openai" else HEURISTIC_VERSION
        if self.backend == "openai" and not self._key and not (self.base_url or os.environ.get("OPENAI_BASE_URL")):
            raise SafeJaxError("the openai backend needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local "
                               "server); use --backend offline to run without one")
        self._redact = Redactor([self._key])

    def __repr__(self) -> str:  # the dataclass repr would show api_key
        return f"SubjectExtractor(backend={self.backend!r}, model={self.model!r}, batch_api={self.batch_api})"

    # ------------------------------------------------------------------ public
    def run(self, records: Iterable[Record | Mapping[str, Any] | str]) -> Extraction:
        """Subjects for every record, in order; failures are results with ``error`` set, not raised.
        Raises SafeJaxError only when the endpoint cannot serve the run at all."""
        recs = _records(records)
        t0 = time.perf_counter()
        report = Report(backend=self.backend, model=str(self.model), records=len(recs),
                        mode="offline" if self.backend == "offline" else ("batch" if self.batch_api else "direct"))
        captions = list(dict.fromkeys(r.caption for r in recs))
        report.captions = len(captions)
        if self.backend == "offline":
            by_caption = {c: SubjectResult(None, c, offline_subjects(c, self.max_subjects)) for c in captions}
            report.ok = len(captions)
        else:
            by_caption = self._remote(captions, report)
        report.elapsed_s = time.perf_counter() - t0
        results = []
        for r in recs:
            base = by_caption[r.caption]
            results.append(SubjectResult(r.id, r.caption, list(base.subjects), base.error, base.cached,
                                         list(base.fuzzy), list(base.dropped)))
        if report.failures:
            log.warning("%d of %d captions got no subjects (not cached; a re-run retries them)",
                        report.failures, report.captions)
        return Extraction(results, report)

    # ------------------------------------------------------------------ remote
    def _cache(self) -> SubjectCache | None:
        if not self.use_cache:
            return None
        return SubjectCache(self.cache_path or default_cache_path(), backend=self.backend, model=str(self.model),
                            prompt_version=llm_prompt.PROMPT_VERSION)

    def _body(self, caption: str) -> dict:
        return llm_prompt.request_body(caption, str(self.model), temperature=self.temperature,
                                       response_format=self.response_format)

    def _client_kwargs(self) -> dict:
        kw: dict[str, Any] = {"api_key": self._key or NO_KEY, "max_retries": 0, "timeout": self.timeout}
        if self.base_url:
            kw["base_url"] = self.base_url
        return kw

    def _remote(self, captions: list[str], report: Report) -> dict[str, SubjectResult]:
        cache = self._cache()
        try:
            return self._remote_with(cache, captions, report)
        finally:
            if cache is not None:
                cache.close()

    def _remote_with(self, cache: SubjectCache | None, captions: list[str], report: Report) -> dict[str, SubjectResult]:
        key_of = {c: answer_key(self.backend, str(self.model), llm_prompt.PROMPT_VERSION, c) for c in captions}
        out: dict[str, SubjectResult] = {}

        def accept(key: str, caption: str, phrases: list[str], cached: bool = False) -> None:
            if cache is not None and not cached:
                cache.put(key, caption, phrases)  # committed now: a crash after this loses nothing
            if caption not in key_of:
                return  # a resumed batch answering a caption of an earlier run: cached only
            m = match_phrases(caption, phrases, threshold=self.fuzzy_threshold, max_subjects=self.max_subjects)
            out[caption] = SubjectResult(None, caption, m.subjects, cached=cached, fuzzy=m.fuzzy, dropped=m.dropped)

        def fail(key: str, caption: str, message: str) -> None:
            if caption in key_of:
                out[caption] = SubjectResult(None, caption, [], error=self._redact(message))
                log.debug("no subjects for %r: %s", caption[:80], self._redact(message))

        todo: list[tuple[str, str]] = []
        hits = cache.get_many(list(key_of.values())) if cache else {}
        for caption, key in key_of.items():
            if not caption.strip():
                out[caption] = SubjectResult(None, caption, [])
            elif key in hits:
                accept(key, caption, hits[key], cached=True)
                report.cache_hits += 1
            else:
                todo.append((key, caption))
        if todo and self.batch_api and cache is None:
            raise SafeJaxError("the Batch API mode needs the cache (it records batches in flight)")
        stopped = None
        try:
            if todo and self.batch_api:
                malformed = self._batch(cache, todo, report, accept, fail)
                if malformed:
                    log.info("%d malformed batch answers: asking again directly", len(malformed))
                    self._direct(malformed, report, accept, fail)
            elif todo:
                self._direct(todo, report, accept, fail)
        except ServiceError as e:
            stopped = str(e)
        if stopped is not None:  # raised outside the except block: no chain back to the server's text
            saved = f"; {len(cache)} answers are saved in {cache.path}, run again to continue" if cache else ""
            raise ServiceError(self._redact(f"{stopped}{saved}"))
        for caption in captions:  # a caption neither answered nor failed (should not happen) is a failure
            out.setdefault(caption, SubjectResult(None, caption, [], error="no answer"))
        for r in out.values():
            report.ok += r.ok
            report.failures += not r.ok
            report.fuzzy += len(r.fuzzy)
            report.dropped += len(r.dropped)
        return out

    def _direct(self, todo: list[tuple[str, str]], report: Report, accept, fail) -> None:
        import openai

        settings = DirectSettings(concurrency=self.concurrency, rate=self.rate, max_retries=self.max_retries,
                                  json_retries=self.json_retries, backoff=self.backoff,
                                  max_consecutive_failures=self.max_consecutive_failures)

        async def main() -> None:
            async with openai.AsyncOpenAI(**self._client_kwargs()) as client:
                with tqdm(total=len(todo), desc="subjects", unit="caption",
                          disable=(None if self.progress is None else not self.progress)) as bar:
                    await ask_all(client, todo, self._body, settings, report, self._redact, accept, fail, bar)

        _run_coroutine(main)

    def _batch(self, cache: SubjectCache, todo: list[tuple[str, str]], report: Report, accept, fail):
        import openai

        settings = BatchSettings(poll_interval=self.poll_interval, workdir=self.batch_workdir,
                                 max_retries=self.max_retries, backoff=self.backoff)
        with openai.OpenAI(**self._client_kwargs()) as client:
            return run_batches(client, cache, todo, self._body, settings, report, self._redact, accept, fail,
                               progress=self.progress,
                               metadata={"source": "safe_jax.text.subjects", "prompt": llm_prompt.PROMPT_VERSION})


def _run_coroutine(make) -> None:
    """asyncio.run, also from code that already runs an event loop (a notebook): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, make()).result()


def extract(captions: Iterable[str], *, backend: str = "auto", model: str | None = None,
            cache_path: str | Path | None = None, **options: Any) -> list[list[str]]:
    """Key subjects of each caption, each a verbatim span of it; ``[]`` for a caption that failed
    (logged, not cached). ``options`` are SubjectExtractor fields (api_key, base_url, batch_api,
    concurrency, rate, max_subjects, progress, ...)."""
    if isinstance(captions, str):
        raise SafeJaxError("extract() takes a list of captions, not one string")
    extractor = SubjectExtractor(backend=backend, model=model, cache_path=cache_path, **options)
    return [r.subjects for r in extractor.run(list(captions)).results]
