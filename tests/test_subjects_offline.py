"""Subject extraction without a network: heuristics, phrase validation, prompt parsing, retry timing."""

from __future__ import annotations

import email.utils
import time

import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.text.subjects import default_cache_path, extract, match_phrases, offline_subjects, resolve_backend
from safe_jax.text.subjects.llm_prompt import SCHEMA, MalformedAnswer, parse_answer, request_body
from safe_jax.text.subjects.ratelimit import Backoff, parse_retry_after
from safe_jax.text.subjects.redact import Redactor

BORIS = ("London's mayor Boris Johnson gives a big thumbs up to photographers during the unveiling of the "
         "2012 Olympic rings on Tower Bridge.")

NEWS = [
    (BORIS, ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"]),
    ("Firefighters at a flooded street in Leeds.", ["Firefighters", "flooded street", "Leeds"]),
    ("Police officers detain a protester outside the Houses of Parliament in London on Tuesday.",
     ["Police officers", "protester", "Houses of Parliament", "London"]),
    ("President Barack Obama speaks during a news conference at the White House in Washington, D.C.",
     ["Barack Obama", "White House", "Washington"]),
    ("German Chancellor Angela Merkel and French President Emmanuel Macron attend a press conference at the "
     "Elysee Palace in Paris.", ["Angela Merkel", "Emmanuel Macron", "Elysee Palace", "Paris"]),
    ("Pope Francis waves to the crowd as he arrives for his weekly general audience in St. Peter's Square.",
     ["Pope Francis", "St. Peter's Square", "crowd"]),
    ("Britain's Andy Murray celebrates at Wimbledon (AP Photo/Kirsty Wigglesworth)", ["Andy Murray", "Wimbledon"]),
    ("U.S. soldiers patrol a market in Kandahar, Afghanistan.", ["U.S. soldiers", "market", "Kandahar", "Afghanistan"]),
    ("a man riding a bike down a street", ["man", "bike", "street"]),
    ("An elephant sprays water at the Chester Zoo.", ["elephant", "Chester Zoo"]),
]


def test_offline_paper_example_exactly():
    assert offline_subjects(BORIS) == ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"]


@pytest.mark.parametrize("caption,expected", NEWS, ids=[c[:30] for c, _ in NEWS])
def test_offline_finds_the_news_subjects(caption, expected):
    subjects = offline_subjects(caption)
    assert set(expected) <= set(subjects), subjects
    assert all(s in caption for s in subjects)


def test_offline_skips_dates_credits_titles_and_descriptors():
    subjects = offline_subjects("Rescue workers search the rubble in Amatrice, Italy, on Monday, August 24. "
                                "REUTERS/Remo Casilli")
    assert "Monday" not in subjects and "August" not in subjects and "Remo Casilli" not in subjects
    assert {"Rescue workers", "Amatrice", "Italy"} <= set(subjects)
    assert "London" not in offline_subjects(BORIS)  # "London's mayor" describes Boris Johnson


@pytest.mark.parametrize("caption", ["", "   ", "...", "THE END", "“Quoted” ‘single’ 'x' “", "2012",
                                     "Ünïcödé Café in São Paulo — naïve résumé", "a " * 300])
def test_offline_never_fails_and_stays_verbatim(caption):
    subjects = offline_subjects(caption, max_subjects=4)
    assert len(subjects) <= 4 and all(s and s in caption for s in subjects)


def test_auto_backend_is_offline_without_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_backend("auto") == "offline"
    assert extract([BORIS, "Firefighters at a flooded street in Leeds."])[0] == NEWS[0][1]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-something-long")
    assert resolve_backend("auto") == "openai"
    with pytest.raises(SafeJaxError, match="unknown subjects backend"):
        resolve_backend("gpt")
    with pytest.raises(SafeJaxError, match="list of captions"):
        extract(BORIS)


def test_openai_backend_without_key_or_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SafeJaxError, match="needs OPENAI_API_KEY"):
        extract(["x"], backend="openai")


def test_match_phrases_exact_fuzzy_and_dropped():
    m = match_phrases(BORIS, ["boris johnson", "Boris Jonson", "Olympic ring", "Eiffel Tower", "  ", "Tower Bridge."])
    assert m.subjects == ["Boris Johnson", "Olympic rings", "Tower Bridge"]  # the caption's own spelling
    assert m.fuzzy == [("Boris Jonson", "Boris Johnson"), ("Olympic ring", "Olympic rings")]
    assert m.dropped == ["Eiffel Tower", "  "]
    assert match_phrases("during the day", ["ring"]).dropped == ["ring"]  # not inside another word
    assert match_phrases("Firefighters at a flooded\n street", ["flooded street"]).subjects == ["flooded\n street"]
    assert match_phrases(BORIS, ["Boris Johnson", "Tower Bridge"], max_subjects=1).subjects == ["Boris Johnson"]


def test_parse_answer_accepts_schema_list_and_fences():
    assert parse_answer('{"subjects": ["a", "b"]}') == ["a", "b"]
    assert parse_answer('```json\n["a"]\n```') == ["a"]
    for bad in (None, "", "{not json", '{"items": []}', '{"subjects": [1]}', '"a"'):
        with pytest.raises(MalformedAnswer):
            parse_answer(bad)


def test_request_body_is_strict_json_schema():
    body = request_body("A dog.", "m", temperature=0.0)
    assert body["response_format"] == {"type": "json_schema", "json_schema": SCHEMA}
    assert SCHEMA["strict"] is True and SCHEMA["schema"]["additionalProperties"] is False
    assert body["messages"][-1] == {"role": "user", "content": "Caption: A dog."}
    assert "temperature" not in request_body("x", "m", temperature=None)
    assert request_body("x", "m", response_format="json_object")["response_format"] == {"type": "json_object"}


def test_retry_after_parsing_and_backoff_jitter():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": future}) <= 30
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None
    b = Backoff(base=1.0, factor=2.0, max_delay=8.0, max_retry_after=60.0)
    for attempt, full in ((0, 1.0), (1, 2.0), (2, 4.0), (5, 8.0)):
        delays = [b.delay(attempt) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays) and len(set(delays)) > 1
    assert b.delay(3, retry_after=1.5) == 1.5 and b.delay(0, retry_after=600) == 60.0


def test_redactor_and_default_cache_location(monkeypatch, tmp_path):
    r = Redactor(["sk-abcdef123", None, "x"])
    assert r("bad key sk-abcdef123!") == "bad key [redacted]!"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "safe_jax" / "subjects.sqlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "safe_jax" / "subjects.sqlite"
