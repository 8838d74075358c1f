"""Batch API mode for whole datasets: half the price of direct requests, answers within 24 h.

Writes the requests as JSONL, uploads it (purpose "batch"), creates the batch on
/v1/chat/completions, polls it with a progress bar, then downloads and parses the output file and
the error file. Batches are recorded in the cache as soon as they are created, so a run that is
stopped while waiting resumes polling the same batches next time instead of paying twice.
A malformed answer cannot be asked again inside a batch: it is handed back for a direct retry.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import openai
from tqdm.auto import tqdm

from safe_jax.text.subjects.cache import SubjectCache
from safe_jax.text.subjects.extraction_report import Report
from safe_jax.text.subjects.llm_prompt import MalformedAnswer, parse_answer
from safe_jax.text.subjects.online import OnAnswer, OnFailure, ServiceError, describe, is_transient, where
from safe_jax.text.subjects.ratelimit import Backoff, parse_retry_after
from safe_jax.text.subjects.redact import Redactor

log = logging.getLogger("safe_jax.text.subjects")

ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
T = TypeVar("T")


@dataclass
class BatchSettings:
    poll_interval: float = 30.0
    max_requests: int = 50_000            # the Batch API's limit per file
    max_bytes: int = 190 * 1024 * 1024    # under its 200 MB file limit
    workdir: str | Path | None = None     # where the JSONL files go (default: a temporary folder)
    max_retries: int = 6
    backoff: Backoff = field(default_factory=Backoff)


class _Caller:
    """Runs one API call with our retries on transient errors; anything else stops the run."""

    def __init__(self, client: openai.OpenAI, settings: BatchSettings, report: Report, redact: Redactor):
        self.client, self.settings, self.report, self.redact = client, settings, report, redact

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            self.report.requests += 1
            try:
                return fn()
            except openai.OpenAIError as e:
                text, transient = describe(e, self.redact), is_transient(e)
                headers = e.response.headers if isinstance(e, openai.APIStatusError) else None
            attempt += 1
            if not transient or attempt > self.settings.max_retries:  # raised outside except: no chain
                tail = f" (gave up after {attempt} attempts)" if transient else ""
                raise ServiceError(f"{where(self.client, self.redact)}: {what}: {text}{tail}")
            delay = self.settings.backoff.delay(attempt - 1, parse_retry_after(headers))
            log.debug("%s: %s; retry %d in %.2f s", what, text, attempt, delay)
            self.report.retries += 1
            time.sleep(delay)


def _chunks(items: list[tuple[str, str]], body_for: Callable[[str], dict],
            settings: BatchSettings) -> list[tuple[dict[str, str], bytes]]:
    out, lines, keys, size = [], [], {}, 0
    for key, caption in items:
        line = json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body_for(caption)},
                          ensure_ascii=False).encode("utf-8") + b"\n"
        if lines and (len(lines) >= settings.max_requests or size + len(line) > settings.max_bytes):
            out.append((keys, b"".join(lines)))
            lines, keys, size = [], {}, 0
        lines.append(line)
        keys[key] = caption
        size += len(line)
    if lines:
        out.append((keys, b"".join(lines)))
    return out


def _answer(line: dict[str, Any]) -> tuple[str | None, str | None]:
    """(content, None) for a successful line, else (None, error message)."""
    response = line.get("response") or {}
    error = line.get("error")
    status = response.get("status_code")
    body = response.get("body") or {}
    if error or status != 200:
        msg = (error or {}).get("message") if isinstance(error, dict) else error
        if not msg and isinstance(body, dict):
            msg = (body.get("error") or {}).get("message")
        return None, f"batch request failed: HTTP {status}: {msg or 'no message'}"
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None, "batch answer has no choices"
    message = choice.get("message") or {}
    if message.get("refusal"):
        return None, f"model refused: {message['refusal']}"
    if choice.get("finish_reason") == "length":
        return "", None  # cut off: parse_answer will call it malformed
    return message.get("content"), None


def run_batches(client: openai.OpenAI, cache: SubjectCache, items: list[tuple[str, str]],
                body_for: Callable[[str], dict], settings: BatchSettings, report: Report, redact: Redactor,
                on_answer: OnAnswer, on_failure: OnFailure, *, progress: bool | None = None,
                metadata: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Answer ``items`` through the Batch API; returns the (key, caption)s whose answer was malformed."""
    call = _Caller(client, settings, report, redact)
    jobs = cache.pending_batches()
    if jobs:
        log.info("resuming %d unfinished batch(es) from the cache", len(jobs))
    covered = {k for its in jobs.values() for k in its}
    todo = [(k, c) for k, c in items if k not in covered]
    with tempfile.TemporaryDirectory(prefix="safe_jax_batch_") as tmp:
        workdir = Path(settings.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n, (keys, data) in enumerate(_chunks(todo, body_for, settings)):
            path = workdir / f"subjects-batch-{int(time.time())}-{n}.jsonl"
            path.write_bytes(data)
            uploaded = call("upload batch input", lambda: client.files.create(
                file=(path.name, data, "application/jsonl"), purpose="batch"))
            batch = call("create batch", lambda: client.batches.create(
                input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                metadata=metadata or {}))
            cache.add_batch(batch.id, keys)
            jobs[batch.id] = keys
            log.info("created batch %s with %d requests (%s)", batch.id, len(keys), path.name)
    return _poll(client, cache, jobs, settings, call, on_answer, on_failure, progress)


def _poll(client: openai.OpenAI, cache: SubjectCache, jobs: dict[str, dict[str, str]], settings: BatchSettings,
          call: _Caller, on_answer: OnAnswer, on_failure: OnFailure, progress: bool | None) -> list[tuple[str, str]]:
    malformed: list[tuple[str, str]] = []
    done: dict[str, int] = {}
    open_jobs = dict(jobs)
    bar = tqdm(total=sum(len(v) for v in jobs.values()), desc="subjects (batch)", unit="caption",
               disable=(None if progress is None else not progress))
    try:
        while open_jobs:
            statuses = []
            for batch_id, keys in list(open_jobs.items()):
                batch = call("poll batch", lambda: client.batches.retrieve(batch_id))
                counts = batch.request_counts
                done[batch_id] = len(keys) if batch.status in TERMINAL else (
                    (counts.completed + counts.failed) if counts else 0)
                statuses.append(batch.status)
                if batch.status in TERMINAL:
                    malformed += _ingest(client, batch, keys, call, on_answer, on_failure)
                    cache.finish_batch(batch_id)
                    del open_jobs[batch_id]
            bar.n = min(bar.total, sum(done.values()))
            bar.set_postfix_str(", ".join(sorted(set(statuses))), refresh=True)
            if open_jobs:
                time.sleep(settings.poll_interval)
    finally:
        bar.close()
    return malformed


def _ingest(client: openai.OpenAI, batch: Any, keys: dict[str, str], call: _Caller, on_answer: OnAnswer,
            on_failure: OnFailure) -> list[tuple[str, str]]:
    malformed, seen = [], set()
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        text = call("download batch results", lambda: client.files.content(file_id)).text
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                key = line["custom_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("batch %s: file %s line %d is not a result line; skipped", batch.id, file_id, n)
                continue
            if key not in keys or key in seen:
                continue
            seen.add(key)
            content, error = _answer(line)
            if error is not None:
                on_failure(key, keys[key], error)
                continue
            try:
                on_answer(key, keys[key], parse_answer(content))
            except MalformedAnswer:
                malformed.append((key, keys[key]))
    if batch.status == "failed":
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        why = "; ".join(filter(None, (getattr(e, "message", None) for e in errors))) or "no reason given"
    else:
        why = f"no answer when the batch ended ({batch.status})"
    for key, caption in keys.items():
        if key not in seen:
            on_failure(key, caption, f"batch {batch.id} {batch.status}: {why}" if batch.status == "failed" else why)
    return malformed
