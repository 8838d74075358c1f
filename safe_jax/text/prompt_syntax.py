"""Hand-written prompt weights: Compel's syntax and AUTOMATIC1111's, parsed to weighted fragments.

Both tools turn a prompt into a list of ``(text, weight)`` fragments, tokenise each fragment on its
own and give every token its fragment's weight. The parsers here reproduce the fragments those
tools produce (same texts, same float weights), so ``conditioning.fragment_token_weights`` gives
the same token ids and weights as Compel and the web UI. Only weighting is supported: Compel's
``.blend()``, ``.and()``, ``.swap()``, ``.attend()`` and ``withLora()``, and A1111's ``BREAK``,
raise a ``SafeJaxError``.

Compel (``compel.prompt_parser``, whose pyparsing grammar we follow rule by rule):
``(Boris Johnson)++`` → 1.1², ``(word)1.3`` → 1.3, ``word-`` → 0.9, ``(a b)--`` → 0.9²; nesting
multiplies; ``\\(`` ``\\)`` are literal; adjacent fragments of equal weight are joined by a space.
Text that does not parse as syntax is kept as literal text, as in Compel.

AUTOMATIC1111 (``parse_prompt_attention``, as documented in its docstring): ``(x)`` ×1.1 per
level, ``[x]`` ÷1.1, ``(x:1.3)`` ×1.3, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` literal, unclosed
brackets apply to the rest of the prompt, adjacent fragments of equal weight are concatenated.
"""

from __future__ import annotations

import re
import string

from safe_jax.errors import SafeJaxError

Fragments = list[tuple[str, float]]
SYNTAXES = ("compel", "a1111")


def parse(prompt: str, syntax: str) -> Fragments:
    """``prompt`` as ``(text, weight)`` fragments under ``syntax`` ("compel" or "a1111")."""
    if syntax == "compel":
        return parse_compel(prompt)
    if syntax == "a1111":
        return parse_a1111(prompt)
    raise SafeJaxError(f"unknown prompt syntax {syntax!r} (choose from {', '.join(SYNTAXES)})")


# ---------------------------------------------------------------------------------------- Compel
_PLUS, _MINUS = 1.1, 0.9  # Compel's attention_plus_base / attention_minus_base
_SYNTAX_CHARS = '()",.+-='
_WHITESPACE = frozenset(string.whitespace)
_ESCAPES = ("\\(", "\\)", '\\"', "\\,", "\\.", "\\+", "\\-", "\\=")
_OPERATOR = re.compile(r"\++|-+|\d+\.\d*|\.\d+|\d+")  # Word('+') | Word('-') | real | int, first match wins
_SIGNS = re.compile(r"\++|-+")
_UNSUPPORTED = re.compile(r"\.(blend|and|add|swap|attend)\(|\b(withLora|useLora)\(")


class _NoParse(Exception):
    """This alternative does not match here; the caller tries the next one (pyparsing's MatchFirst)."""


def parse_compel(prompt: str) -> Fragments:
    """Compel's ``PromptParser().parse_conjunction(prompt)`` for a single weighted prompt, flattened."""
    if m := _UNSUPPORTED.search(prompt):
        raise SafeJaxError(f"compel syntax: {m.group(0)[:-1]!r} is not supported, only weights "
                           f"((text)+, (text)-, (text)1.3, word+): {prompt!r}")
    prompt = re.sub(r",(\S)", r", \1", prompt)  # Compel enforces whitespace after commas
    if not prompt.strip():
        return [("", 1.0)]
    return _fuse(_CompelParser(prompt).top_level()) or [("", 1.0)]


def _unescape(text: str) -> str:
    """What ``compel.prompt_parser.Fragment()`` does to its text: only \\( \\) \\" become literal."""
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def _fragment(text: str, weight: float) -> tuple[str, float]:
    """A parsed fragment; Compel builds it twice (parse, then flatten), unescaping each time."""
    return _unescape(_unescape(text)), weight


def _fuse(fragments: Fragments) -> Fragments:
    """Join neighbours of equal weight with a space (Compel's ``fuse_fragments``)."""
    fused: Fragments = []
    for text, weight in fragments:
        if fused and fused[-1][1] == weight:
            fused[-1] = (_unescape(fused[-1][0] + " " + text), weight)  # a new Fragment: unescaped again
        else:
            fused.append((text, weight))
    return fused


class _CompelParser:
    """Recursive descent over Compel's grammar; each method returns (fragments, end) or raises _NoParse."""

    def __init__(self, text: str):
        self.s = text
        self._memo: dict[tuple[int, float], tuple[Fragments, int] | None] = {}

    def top_level(self) -> Fragments:
        # prompt = ZeroOrMore(attention | quoted | parenthesized | free_word), whitespace skipped
        out, i, n = [], 0, len(self.s)
        while True:
            i = self._skip(i)
            if i >= n:
                return out
            for alternative in (self._attention, self._quoted, self._parenthesized):
                try:
                    frags, i = alternative(i, 1.0)
                    out += frags
                    break
                except _NoParse:
                    continue
            else:  # free_word: anything up to whitespace, syntax and all, as literal text
                j = i
                while j < n and self.s[j] not in _WHITESPACE:
                    j += 1
                out.append(_fragment(self.s[i:j], 1.0))
                i = j

    def _skip(self, i: int) -> int:
        while i < len(self.s) and self.s[i] in _WHITESPACE:
            i += 1
        return i

    def _word_end(self, i: int) -> int:
        """End of the non_syntax_word at ``i``: escapes, ±-joined parts, anything not syntax or space."""
        s, n, j = self.s, len(self.s), i
        while j < n:
            if s.startswith(_ESCAPES, j):
                j += 2
            elif s[j] in "+-" and j + 1 < n and s[j + 1] not in _WHITESPACE and s[j + 1] not in _SYNTAX_CHARS:
                j += 1
            elif s[j] not in _WHITESPACE and s[j] not in _SYNTAX_CHARS:
                j += 1
            else:
                break
        return j

    def _word(self, i: int, scale: float) -> tuple[Fragments, int]:
        j = self._word_end(i)
        if j == i:
            raise _NoParse
        return [_fragment(self.s[i:j], 1.0 * scale)], j

    def _attention(self, i: int, scale: float) -> tuple[Fragments, int]:
        """(group)op or "quoted"op with op in +…, -…, a number; or word+… / word-…; no space before op."""
        s = self.s
        grouped = i < len(s) and s[i] in '("'
        if grouped:
            _, end = self._group(i, 1.0)  # where the group ends; its weights come below
            m = _OPERATOR.match(s, end)
        else:
            end = self._word_end(i)
            if end == i:
                raise _NoParse
            m = _SIGNS.match(s, end)
        if not m:
            raise _NoParse
        op = m.group(0)
        weight = _PLUS ** len(op) if op[0] == "+" else _MINUS ** len(op) if op[0] == "-" else float(op)
        frags, _ = self._group(i, scale * weight) if grouped else self._word(i, scale * weight)
        return frags, m.end()

    def _parenthesized(self, i: int, scale: float) -> tuple[Fragments, int]:
        if i >= len(self.s) or self.s[i] != "(":
            raise _NoParse
        return self._group(i, scale)

    def _quoted(self, i: int, scale: float) -> tuple[Fragments, int]:
        if i >= len(self.s) or self.s[i] != '"':
            raise _NoParse
        return self._group(i, scale)

    def _group(self, i: int, scale: float) -> tuple[Fragments, int]:
        """The (…) or "…" at ``i``, memoised: alternatives retry the same group (pyparsing does too)."""
        key = (i, scale)
        if key not in self._memo:
            try:
                self._memo[key] = self._parse_group(i, scale)
            except _NoParse:
                self._memo[key] = None
        if self._memo[key] is None:
            raise _NoParse
        return self._memo[key]

    def _parse_group(self, i: int, scale: float) -> tuple[Fragments, int]:
        s = self.s
        if s[i] == "(":
            frags, j = self._inner(i + 1, scale, closing=")")
            return frags, j + 1
        j = i + 1  # a quoted string: \" inside is an escaped quote
        while j < len(s) and s[j] != '"':
            j += 2 if s.startswith('\\"', j) else 1
        if j >= len(s):
            raise _NoParse
        body = s[i + 1:j].replace('\\"', '"').replace('"', '\\"')  # QuotedString unescapes; Compel re-escapes
        if not body.strip():
            return [("", 1.0 * scale)], j + 1
        frags, _ = _CompelParser(body)._inner(0, scale, closing=None)
        return frags, j + 1

    def _inner(self, i: int, scale: float, closing: str | None) -> tuple[Fragments, int]:
        """fragment_including_commas_or_periods, then ``closing`` (or the end of the text)."""
        s, out = self.s, []
        while True:
            i = self._skip(i)
            if closing is None and i >= len(s):
                return out, i
            if closing is not None and i < len(s) and s[i] == closing:
                return out, i
            for alternative in (self._attention, self._parenthesized, self._quoted, self._word):
                try:
                    frags, i = alternative(i, scale)
                    out += frags
                    break
                except _NoParse:
                    continue
            else:
                if i < len(s) and s[i] in ",.":
                    out.append(_fragment(s[i], 1.0 * scale))
                    i += 1
                else:
                    raise _NoParse


# ------------------------------------------------------------------------------------ AUTOMATIC1111
_A1111_TOKENS = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|      # escapes (a lone backslash is dropped)
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|          # (text:1.3)
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_a1111(prompt: str) -> Fragments:
    """AUTOMATIC1111's ``parse_prompt_attention(prompt)`` (its documented semantics, our code)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _A1111_TOKENS.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_open.append(len(res))
        elif text == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise SafeJaxError(f"a1111 syntax: bad weight {weight!r} in {prompt!r}") from None
            multiply_from(round_open.pop(), factor)
        elif text == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND)
        elif text == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE)
        else:
            if _BREAK.search(text):
                raise SafeJaxError(f"a1111 syntax: BREAK is not supported (one 77-token chunk per prompt) in {prompt!r}")
            res.append([text, 1.0])
    for start in round_open:
        multiply_from(start, _ROUND)
    for start in square_open:
        multiply_from(start, _SQUARE)
    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for text, weight in res[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]
