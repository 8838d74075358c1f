"""Our prompt for the key visual subjects of a news caption, its JSON schema, and the answer parser.

The paper (GPT-3.5) does not publish its prompt; this one is ours. Bump PROMPT_VERSION whenever the
text or schema changes: it is part of the cache key, so old answers are not reused for a new prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any

PROMPT_VERSION = "subjects-v1"

SYSTEM_PROMPT = """\
You pick the key visual subjects of a news photo caption, for a text-to-image model that must \
draw them. Subjects are the people, groups, animals, objects, vehicles, buildings and places that \
would be visible in the photo, most important first.
Rules:
- Answer with at most 6 short noun phrases (1 to 4 words each).
- Copy every phrase exactly as it appears in the caption: same words, same spelling, same case. \
Never paraphrase, translate, expand or combine words from different parts of the caption.
- For a person, give the name rather than the title or role ("Boris Johnson", not "mayor").
- Leave out dates, times, numbers on their own, abstract nouns, events without a visible thing, \
verbs, and photo credits (agency or photographer names).
Answer only with JSON of the form {"subjects": ["...", "..."]}."""

EXAMPLE_CAPTION = (
    "London's mayor Boris Johnson gives a big thumbs up to photographers during the unveiling "
    "of the 2012 Olympic rings on Tower Bridge."
)
EXAMPLE_ANSWER = {"subjects": ["Boris Johnson", "Olympic rings", "Tower Bridge", "photographers"]}

SCHEMA: dict[str, Any] = {
    "name": "caption_subjects",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "subjects": {
                "type": "array",
                "description": "Key visual subjects, each copied verbatim from the caption.",
                "items": {"type": "string"},
            }
        },
        "required": ["subjects"],
        "additionalProperties": False,
    },
}

RESPONSE_FORMATS = ("json_schema", "json_object", "none")


class MalformedAnswer(ValueError):
    """The model's reply is not the JSON we asked for; worth asking again."""


def user_message(caption: str) -> str:
    return f"Caption: {caption}"


def messages(caption: str) -> list[dict[str, str]]:
    """System prompt, one worked example, then the caption."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(EXAMPLE_CAPTION)},
        {"role": "assistant", "content": json.dumps(EXAMPLE_ANSWER)},
        {"role": "user", "content": user_message(caption)},
    ]


def request_body(caption: str, model: str, *, temperature: float | None = 0.0,
                 response_format: str = "json_schema") -> dict[str, Any]:
    """The /v1/chat/completions body, shared by direct requests and Batch API lines."""
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}, not {response_format!r}")
    body: dict[str, Any] = {"model": model, "messages": messages(caption)}
    if response_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": SCHEMA}
    elif response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    if temperature is not None:
        body["temperature"] = temperature
    return body


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_answer(content: str | None) -> list[str]:
    """The subject phrases of a reply: ``{"subjects": [...]}`` (or a bare list, or either fenced)."""
    if content is None or not content.strip():
        raise MalformedAnswer("empty answer")
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedAnswer(f"answer is not JSON ({e.msg} at char {e.pos})") from None
    if isinstance(data, dict):
        if "subjects" not in data:
            raise MalformedAnswer("answer has no 'subjects' field")
        data = data["subjects"]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise MalformedAnswer("'subjects' is not a list of strings")
    return data
