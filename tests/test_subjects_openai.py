"""The OpenAI backend through the real ``openai`` client against a loopback server on 127.0.0.1."""

from __future__ import annotations

import json
import sqlite3
import time
import traceback

import pytest
from loopback_openai import LoopbackOpenAI, Reply

from safe_jax.errors import SafeJaxError
from safe_jax.text.subjects import SubjectExtractor
from safe_jax.text.subjects import batch as batch_mod
from safe_jax.text.subjects.cache import SubjectCache
from safe_jax.text.subjects.llm_prompt import PROMPT_VERSION
from safe_jax.text.subjects.ratelimit import Backoff

KEY = "sk-loopback-SECRET-7f3a9c2e1d5b"
BORIS = ("London's mayor Boris Johnson gives a big thumbs up to photographers during the unveiling of the "
         "2012 Olympic rings on Tower Bridge.")
LEEDS = "Firefighters at a flooded street in Leeds."
ROME = "The Italian police arrest a man in Rome."
ANSWERS = {
    BORIS: ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"],
    LEEDS: ["Firefighters", "flooded street", "Leeds"],
    ROME: ["Italian police", "man", "Rome"],
}


def answer(caption: str) -> str:
    return json.dumps({"subjects": ANSWERS.get(caption, [caption.split()[0]])})


def extractor(srv: LoopbackOpenAI, tmp_path, **kw) -> SubjectExtractor:
    kw.setdefault("cache_path", tmp_path / "cache.sqlite")
    kw.setdefault("backoff", Backoff(base=0.01, max_delay=0.05))
    kw.setdefault("rate", None)
    return SubjectExtractor(backend="openai", api_key=KEY, base_url=srv.base_url, progress=False, **kw)


def test_success_path_sends_our_prompt_and_schema(tmp_path):
    with LoopbackOpenAI(answer) as srv:
        results, report = extractor(srv, tmp_path, model="my-model").run(
            [{"id": "a", "caption": BORIS}, {"id": "b", "caption": LEEDS}, {"id": "c", "caption": ROME}])
    assert [r.subjects for r in results] == [ANSWERS[BORIS], ANSWERS[LEEDS], ANSWERS[ROME]]
    assert [r.id for r in results] == ["a", "b", "c"] and all(r.ok and not r.cached for r in results)
    assert (report.ok, report.failures, report.requests, report.retries) == (3, 0, 3, 0)
    assert srv.auth == {f"Bearer {KEY}"}
    body = next(b for b in srv.chat_bodies if BORIS in b["messages"][-1]["content"])
    assert body["model"] == "my-model" and body["temperature"] == 0.0
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["messages"][0]["role"] == "system" and body["messages"][-1]["content"] == f"Caption: {BORIS}"


def test_429_then_success_honours_retry_after(tmp_path):
    plan = lambda n, c: Reply(429, "slow down", headers={"Retry-After": "0.3"}) if n == 1 else None  # noqa: E731
    with LoopbackOpenAI(answer, plan=plan) as srv:
        t0 = time.perf_counter()
        results, report = extractor(srv, tmp_path).run([BORIS])
        elapsed = time.perf_counter() - t0
    assert results[0].subjects == ANSWERS[BORIS]
    assert (report.requests, report.retries, srv.chat_count()) == (2, 1, 2)
    assert elapsed >= 0.3  # waited as told, not the 10 ms backoff


def test_timeout_is_retried(tmp_path):
    plan = lambda n, c: Reply(delay=1.0) if n == 1 else None  # noqa: E731
    with LoopbackOpenAI(answer, plan=plan) as srv:
        results, report = extractor(srv, tmp_path, timeout=0.3).run([LEEDS])
    assert results[0].subjects == ANSWERS[LEEDS] and report.retries == 1


def test_500_until_retries_exhausted_is_a_clear_error_and_keeps_answers(tmp_path):
    plan = lambda n, c: Reply(500, "the server is on fire") if c == LEEDS else None  # noqa: E731
    with LoopbackOpenAI(answer, plan=plan) as srv:
        with pytest.raises(SafeJaxError) as err:
            extractor(srv, tmp_path, concurrency=1, max_retries=2).run([BORIS, LEEDS, ROME])
        assert srv.chat_count() == 1 + 3  # BORIS, then LEEDS three times; ROME never asked
    msg = str(err.value)
    assert "HTTP 500: the server is on fire" in msg and "gave up after 3 attempts" in msg
    assert "1 answers are saved" in msg and "run again" in msg and "\n" not in msg
    with LoopbackOpenAI(answer) as srv:
        results, report = extractor(srv, tmp_path).run([BORIS, LEEDS, ROME])
        assert srv.chat_count() == 2  # only what was missing
    assert report.cache_hits == 1 and [r.subjects for r in results] == [ANSWERS[BORIS], ANSWERS[LEEDS], ANSWERS[ROME]]


def test_malformed_json_is_retried_then_a_failure_not_a_crash(tmp_path):
    def plan(n, caption):
        if caption == ROME:
            return Reply(content="Sure! The subjects are the police and Rome.")
        if caption == LEEDS and n <= 2:
            return Reply(content='{"subjects": ["Firefighters", ')
        return None

    with LoopbackOpenAI(answer, plan=plan) as srv:
        results, report = extractor(srv, tmp_path, concurrency=1, json_retries=2).run([LEEDS, BORIS, ROME])
    leeds, boris, rome = results
    assert leeds.subjects == ANSWERS[LEEDS] and boris.subjects == ANSWERS[BORIS]
    assert rome.subjects == [] and "malformed answer after 3 attempts" in rome.error
    assert (report.ok, report.failures, report.requests, report.retries) == (2, 1, 3 + 1 + 3, 2 + 2)
    with LoopbackOpenAI(answer) as srv:  # the failure was not cached: a re-run asks for it alone
        results, report = extractor(srv, tmp_path).run([LEEDS, BORIS, ROME])
        assert srv.chat_count() == 1 and results[2].subjects == ANSWERS[ROME]


def test_phrases_not_in_caption_are_fuzzy_matched_or_dropped_and_counted(tmp_path):
    reply = json.dumps({"subjects": ["Boris Jonson", "Eiffel Tower", "tower bridge", "Olympic Rings"]})
    with LoopbackOpenAI(lambda c: reply) as srv:
        results, report = extractor(srv, tmp_path).run([BORIS])
    r = results[0]
    assert r.subjects == ["Boris Johnson", "Tower Bridge", "Olympic rings"]
    assert r.fuzzy == [("Boris Jonson", "Boris Johnson")] and r.dropped == ["Eiffel Tower"]
    assert (report.fuzzy, report.dropped) == (1, 1)
    with LoopbackOpenAI(answer) as srv:  # the raw answer is cached and validated again on read
        results, report = extractor(srv, tmp_path).run([BORIS])
        assert srv.count == 0 and (report.fuzzy, report.dropped, report.cache_hits) == (1, 1, 1)


def test_rerun_makes_zero_requests(tmp_path):
    captions = [f"Caption number {i} about Tower Bridge." for i in range(20)] + [BORIS, BORIS]
    with LoopbackOpenAI(answer) as srv:
        first, report = extractor(srv, tmp_path, concurrency=8).run(captions)
        assert srv.chat_count() == 21 and report.captions == 21  # duplicates asked once
    with LoopbackOpenAI(answer) as srv:
        second, report = extractor(srv, tmp_path).run(captions)
        assert srv.count == 0
    assert (report.cache_hits, report.requests) == (21, 0)
    assert [r.subjects for r in first] == [r.subjects for r in second] and all(r.cached for r in second)


def test_concurrency_and_rate_limits_hold(tmp_path):
    captions = [f"Protesters in city {i}." for i in range(16)]
    with LoopbackOpenAI(answer, delay=0.05) as srv:
        extractor(srv, tmp_path, concurrency=4, use_cache=False).run(captions)
        assert 2 <= srv.max_active <= 4
    with LoopbackOpenAI(answer) as srv:
        t0 = time.perf_counter()
        extractor(srv, tmp_path, concurrency=8, rate=20.0, use_cache=False).run(captions[:6])
        assert time.perf_counter() - t0 >= 5 / 20 - 0.01


def test_batch_api_whole_flow(tmp_path):
    captions = [BORIS, LEEDS, ROME, "A dog in Central Park."]

    def batch_plan(caption):
        if caption == ROME:
            return Reply(500, "batch worker crashed")
        if caption == LEEDS:
            return Reply(content="not json at all")
        return None

    with LoopbackOpenAI(answer, batch_plan=batch_plan, batch_polls=2) as srv:
        results, report = extractor(srv, tmp_path, batch_api=True, poll_interval=0.01).run(captions)
        requests = list(srv.requests)
        upload, create = srv.uploads[0], srv.batch_creates[0]
    assert len(srv.uploads) == 1 and upload["purpose"] == "batch" and upload["filename"].endswith(".jsonl")
    lines = [json.loads(x) for x in upload["data"].decode().splitlines()]
    assert len(lines) == 4 and len({x["custom_id"] for x in lines}) == 4
    assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)
    assert all(x["body"]["response_format"]["json_schema"]["strict"] for x in lines)
    assert create["endpoint"] == "/v1/chat/completions" and create["completion_window"] == "24h"
    polls = [p for m, p in requests if m == "GET" and "/batches/" in p]
    downloads = [p for m, p in requests if p.endswith("/content")]
    assert len(polls) == 3 and len(downloads) == 2  # in_progress, in_progress, completed; output + error file
    boris, leeds, rome, dog = results
    assert boris.subjects == ANSWERS[BORIS] and dog.subjects == ["A"]
    assert leeds.subjects == ANSWERS[LEEDS]  # malformed in the batch, asked again directly
    assert rome.subjects == [] and "HTTP 500: batch worker crashed" in rome.error
    assert (report.ok, report.failures, report.mode) == (3, 1, "batch")
    assert [p for m, p in requests if p.endswith("/chat/completions")] == ["/v1/chat/completions"]
    cache = SubjectCache(tmp_path / "cache.sqlite", backend="openai", model="gpt-4o-mini", prompt_version=PROMPT_VERSION)
    assert len(cache) == 3 and cache.pending_batches() == {}
    with LoopbackOpenAI(answer) as srv:  # re-run: one batch holding only the failed caption
        results, report = extractor(srv, tmp_path, batch_api=True, poll_interval=0.01).run(captions)
        assert len(srv.uploads) == 1 and len(srv.uploads[0]["data"].splitlines()) == 1
    assert report.cache_hits == 3 and results[2].subjects == ANSWERS[ROME]


def test_batch_api_resumes_a_batch_after_a_crash(tmp_path, monkeypatch):
    def crash(_):
        raise KeyboardInterrupt

    with LoopbackOpenAI(answer, batch_polls=1) as srv:
        monkeypatch.setattr(batch_mod.time, "sleep", crash)
        with pytest.raises(KeyboardInterrupt):
            extractor(srv, tmp_path, batch_api=True, poll_interval=0.01).run([BORIS, LEEDS])
        monkeypatch.undo()
        assert len(srv.uploads) == 1
        results, report = extractor(srv, tmp_path, batch_api=True, poll_interval=0.01).run([BORIS, LEEDS])
        assert len(srv.uploads) == 1 and len(srv.batch_creates) == 1  # polled the same batch, paid once
    assert [r.subjects for r in results] == [ANSWERS[BORIS], ANSWERS[LEEDS]]


def test_wrong_key_is_one_line_without_the_key(tmp_path):
    with LoopbackOpenAI(answer, expect_key="sk-the-right-one") as srv:
        with pytest.raises(SafeJaxError) as err:
            extractor(srv, tmp_path).run([BORIS, LEEDS])
        assert srv.chat_count() <= 2  # not retried
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value) and "[redacted]" in str(err.value)
    chain, e = [], err.value
    while e is not None:  # nothing in the exception chain carries the key either
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert len(chain) == 1 and KEY not in "".join(traceback.format_exception(err.value))


def test_key_never_in_logs_output_or_cache(tmp_path, monkeypatch, caplog, capfd):
    """Every path at DEBUG logging: retries, bad JSON, dropped phrases, batch mode, a rejected key."""
    import logging

    from launch.subjects import main
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx2", "httpcore2", "safe_jax"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate([BORIS, LEEDS, ROME])))
    cache = tmp_path / "cache.sqlite"

    def plan(n, caption):
        if n == 1:
            return Reply(429, f"rate limited for key {KEY}", headers={"Retry-After": "0"})
        if caption == ROME:
            return Reply(content=f"not json {KEY}")
        return None

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    batch_plan = lambda c: Reply(content=f"not json {KEY}") if c == ROME else None  # noqa: E731
    with LoopbackOpenAI(lambda c: json.dumps({"subjects": ["Eiffel Tower", c.split()[0]]}), plan=plan,
                        batch_plan=batch_plan) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        rc1 = main(["--in", str(inp), "--out", str(tmp_path / "out.jsonl"), "--cache", str(cache), "-v", "--rate", "0"])
        rc2 = main(["--in", str(inp), "--out", str(tmp_path / "batch.jsonl"), "--cache", str(tmp_path / "b.sqlite"),
                    "--batch-api", "--poll-interval", "0.01", "-v"])
        assert f"Bearer {KEY}" in srv.auth  # the key was really used
    with LoopbackOpenAI(answer, expect_key="sk-another-key") as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        rc3 = main(["--in", str(inp), "--out", str(tmp_path / "never.jsonl"), "--cache", str(cache), "--no-cache"])
    assert (rc1, rc2, rc3) == (1, 1, 2)
    out, err = capfd.readouterr()
    assert "HTTP 401" in err and "[redacted]" in err
    logged = caplog.text + "".join(str(r.args) + r.getMessage() for r in caplog.records)
    assert "retry" in logged.lower()  # the logs were really captured at DEBUG
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"out.jsonl", "batch.jsonl", "cache.sqlite", "b.sqlite"} <= {p.name for p in files}
    assert sqlite3.connect(cache).execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 2
    for text in (out, err, logged, *(p.read_bytes().decode("latin-1") for p in files)):
        assert KEY not in text
        assert KEY[8:] not in text


def test_local_server_without_key_through_extract(tmp_path, monkeypatch):
    """vLLM/Ollama style: OPENAI_BASE_URL and no key; the library's one-call API."""
    from safe_jax.text.subjects import extract

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with LoopbackOpenAI(answer) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        subjects = extract([BORIS, LEEDS], backend="openai", model="llama3", cache_path=tmp_path / "c.sqlite",
                           progress=False)
        assert srv.chat_bodies[0]["model"] == "llama3" and srv.auth == {"Bearer no-key"}
    assert subjects == [ANSWERS[BORIS], ANSWERS[LEEDS]]


def test_rejected_captions_fail_alone_until_too_many_in_a_row(tmp_path):
    plan = lambda n, c: Reply(400, "content policy") if c != BORIS else None  # noqa: E731
    with LoopbackOpenAI(answer, plan=plan) as srv:
        results, report = extractor(srv, tmp_path, concurrency=1).run([LEEDS, BORIS, ROME])
        assert srv.chat_count() == 3  # a 400 is not retried
    assert [r.ok for r in results] == [False, True, False] and "HTTP 400: content policy" in results[0].error
    captions = [f"Rejected caption {i}." for i in range(10)]
    with LoopbackOpenAI(answer, plan=plan) as srv:
        with pytest.raises(SafeJaxError, match="3 captions failed in a row; last: HTTP 400: content policy"):
            extractor(srv, tmp_path, concurrency=1, max_consecutive_failures=3).run(captions)
        assert srv.chat_count() == 3


def test_corrupt_cache_is_one_clear_line(tmp_path):
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with LoopbackOpenAI(answer) as srv:
        with pytest.raises(SafeJaxError, match="cannot open the subjects cache"):
            extractor(srv, tmp_path, cache_path=bad).run([BORIS])
        assert srv.count == 0
