"""Direct chat-completion requests, many at once, with our own retries.

The SDK's retries are off (``max_retries=0``) so that pacing, backoff and counting are ours and
testable: at most ``concurrency`` captions in flight, request starts spaced by ``rate``, transient
errors (429, 408, 409, 5xx, timeouts, connection errors) retried with exponential backoff and jitter
(Retry-After honoured), a malformed answer asked again ``json_retries`` times and then recorded as
that caption's failure. An endpoint that cannot serve us at all (bad key, unknown model, no quota,
or still failing after every retry) stops the run with one clear line; answers already received
are in the cache by then.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import openai

from safe_jax.errors import SafeJaxError
from safe_jax.text.subjects.extraction_report import Report
from safe_jax.text.subjects.llm_prompt import MalformedAnswer, parse_answer
from safe_jax.text.subjects.ratelimit import Backoff, RateLimiter, parse_retry_after
from safe_jax.text.subjects.redact import Redactor

log = logging.getLogger("safe_jax.text.subjects")

OnAnswer = Callable[[str, str, list[str]], None]
OnFailure = Callable[[str, str, str], None]


class ServiceError(SafeJaxError):
    """The endpoint cannot serve this run: wrong key or model, no quota, or down past every retry."""


@dataclass
class DirectSettings:
    concurrency: int = 16
    rate: float | None = 10.0
    max_retries: int = 6
    json_retries: int = 2
    backoff: Backoff = field(default_factory=Backoff)
    max_consecutive_failures: int = 50


def describe(e: BaseException, redact: Redactor) -> str:
    """One short line for an SDK error, with any secret removed."""
    if isinstance(e, openai.APIStatusError):
        msg = e.body.get("message") if isinstance(e.body, dict) else None  # the SDK unwraps {"error": ...}
        text = f"HTTP {e.status_code}: {msg or e.message}"
    elif isinstance(e, openai.APITimeoutError):
        text = "request timed out"
    elif isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e.__context__
        text = f"connection failed ({cause})" if cause else "connection failed"
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(redact(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def is_transient(e: BaseException) -> bool:
    if isinstance(e, openai.APIStatusError):
        if e.status_code == 429 and getattr(e, "code", None) == "insufficient_quota":
            return False
        return e.status_code in (408, 409, 429) or e.status_code >= 500
    return isinstance(e, (openai.APIConnectionError, openai.APITimeoutError))


def is_fatal(e: BaseException) -> bool:
    if isinstance(e, openai.APIStatusError):
        return e.status_code in (401, 403, 404) or (e.status_code == 429 and not is_transient(e))
    return False


def _content(completion: Any) -> str | None:
    try:
        choice = completion.choices[0]
        message = choice.message
    except (AttributeError, IndexError, TypeError):
        raise MalformedAnswer("answer is not a chat completion with a choice") from None
    if getattr(message, "refusal", None):
        raise MalformedAnswer(f"model refused: {message.refusal}")
    if choice.finish_reason == "length":
        raise MalformedAnswer("answer cut off (finish_reason=length)")
    return message.content


async def ask_all(client: openai.AsyncOpenAI, items: list[tuple[str, str]], body_for: Callable[[str], dict],
                  settings: DirectSettings, report: Report, redact: Redactor, on_answer: OnAnswer,
                  on_failure: OnFailure, progress: Any = None) -> None:
    """Answer every (key, caption); each answer or failure goes to its callback as it arrives."""
    limiter = RateLimiter(settings.rate)
    queue = list(reversed(items))
    state = {"consecutive_failures": 0}

    def failed(key: str, caption: str, message: str) -> None:
        on_failure(key, caption, message)
        state["consecutive_failures"] += 1
        if state["consecutive_failures"] >= settings.max_consecutive_failures:
            raise ServiceError(f"{state['consecutive_failures']} captions failed in a row; last: {message}")

    async def one(key: str, caption: str) -> None:
        transient = malformed = 0
        while True:
            await limiter.wait()
            report.requests += 1
            try:
                completion = await client.chat.completions.create(**body_for(caption))
                phrases = parse_answer(_content(completion))
            except MalformedAnswer as e:
                malformed += 1
                log.debug("malformed answer (%d of %d): %s", malformed, settings.json_retries + 1, redact(e))
                if malformed > settings.json_retries:
                    failed(key, caption, f"malformed answer after {malformed} attempts: {redact(e)}")
                    return
                report.retries += 1
                continue
            except openai.OpenAIError as e:
                what, fatal, transient_error = describe(e, redact), is_fatal(e), is_transient(e)
                headers = e.response.headers if isinstance(e, openai.APIStatusError) else None
            else:
                on_answer(key, caption, phrases)
                state["consecutive_failures"] = 0
                return
            # Raised outside the except block, so no exception chain carries the server's text.
            if fatal:
                raise ServiceError(f"{where(client, redact)}: {what}")
            if not transient_error:
                failed(key, caption, what)
                return
            transient += 1
            if transient > settings.max_retries:
                raise ServiceError(f"{where(client, redact)}: {what} (gave up after {transient} attempts)")
            delay = settings.backoff.delay(transient - 1, parse_retry_after(headers))
            log.debug("%s; retry %d of %d in %.2f s", what, transient, settings.max_retries, delay)
            report.retries += 1
            await asyncio.sleep(delay)

    async def worker() -> None:
        while queue:
            key, caption = queue.pop()
            await one(key, caption)
            if progress is not None:
                progress.update(1)

    error = None
    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, min(settings.concurrency, len(items)))):
                tg.create_task(worker())
    except BaseExceptionGroup as group:
        error = next((e for e in _leaves(group) if isinstance(e, SafeJaxError)), None)
        if error is None:
            raise
    if error is not None:
        raise error.with_traceback(None)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def where(client: openai.AsyncOpenAI | openai.OpenAI, redact: Redactor) -> str:
    return redact(str(client.base_url).rstrip("/"))
