"""SAFE part 1: scale up a caption's subjects in the text conditioning.

The data path, top to bottom:

    caption, subjects ──format_caption──► text + character spans of the subject mentions
    text ──tokenizer (offsets)──► ids [B, 77] and per-token weights [B, 77] (1 = unweighted)
    ids ──CLIP text encoder──► z [B, 77, C];  "" ──► z∅
    z, z∅, weights ──weighted_embeddings──► z' (Compel: z∅ + w·(z − z∅); A1111: z·w, mean restored)

Weights travel as float arrays, never as Python structure, so one compiled function serves every
prompt, and ``weighted_embeddings`` / ``encode_weighted`` can sit inside a training step.
Compel's down-weighting (w < 1) is reproduced too: each run of equal weight below 1 is a Compel
fragment; the prompt is re-encoded with that run masked out of the attention, weighted the same
way, and blended in with λ = tan((1 − w)·π/2) (``compel.embeddings_provider``).
Prompts with hand-written weights (``prompt_syntax``) take the same path via
``fragment_token_weights``, which tokenises fragment by fragment as Compel and A1111 do.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.text import prompt_syntax

DEFAULT_WEIGHT = 1.1**2  # Compel's "++"; the paper's choice among 1.1, 1.21, 1.331, 1.4641
PREFIX_TEMPLATE = "A photo of {subjects}. {caption}"  # the authors' prefix (their code)
FORMATS = ("plain", "prefix")
METHODS = ("compel", "a1111")
MAX_LENGTH = 77

Span = tuple[int, int]


class TokenWeights(NamedTuple):
    """Token ids [B, T] int32 and per-token weights [B, T] float32 (BOS/EOS/padding weigh 1)."""

    ids: np.ndarray
    weights: np.ndarray


# ------------------------------------------------------------------------- subjects → char spans
def find_mentions(text: str, phrase: str) -> list[Span]:
    """Every mention of ``phrase`` in ``text``: case-insensitive, whole words, any whitespace between.

    If there is none, run-together spellings are tried ("BorisJohnson", "Tower-Bridge" for
    "Tower Bridge", or the other way round), as the authors' code falls back to.
    """
    words = phrase.split()
    if not words:
        return []

    def search(pattern: str) -> list[Span]:
        head = r"(?<!\w)" if re.match(r"\w", phrase.strip()[0]) else ""
        tail = r"(?!\w)" if re.match(r"\w", phrase.strip()[-1]) else ""
        return [m.span() for m in re.finditer(head + pattern + tail, text, re.IGNORECASE)]

    spans = search(r"\s+".join(map(re.escape, words)))
    if not spans:
        chars = [c for c in "".join(words) if c != "-"]
        spans = search(r"[\s\-]*".join(map(re.escape, chars)))
    return spans


def format_caption(caption: str, subjects: Sequence[str], fmt: str = "plain") -> tuple[str, list[Span]]:
    """The text to encode and the character spans to up-weight.

    ``fmt`` is "plain" (the caption as is), "prefix" (``PREFIX_TEMPLATE``) or a template of your
    own with ``{subjects}`` (joined by ", ") and ``{caption}``. The subject slots of a prefix are
    weighted, and so is every mention of a subject in the caption; the template's own words never.
    """
    subjects = [s.strip() for s in subjects if s and s.strip()]
    if fmt == "plain" or not subjects:
        if fmt not in FORMATS:
            _template_fields(fmt)  # still reject a malformed template
        return caption, _merge([span for s in subjects for span in find_mentions(caption, s)])
    template = PREFIX_TEMPLATE if fmt == "prefix" else fmt
    text, spans = "", []
    for literal, field in _template_fields(template):
        text += literal
        if field == "subjects":
            for k, subject in enumerate(subjects):
                text += ", " if k else ""
                spans.append((len(text), len(text) + len(subject)))
                text += subject
        elif field == "caption":
            spans += [(len(text) + a, len(text) + b) for s in subjects for a, b in find_mentions(caption, s)]
            text += caption
    return text, _merge(spans)


def _template_fields(template: str) -> list[tuple[str, str | None]]:
    try:
        parts = [(literal, field) for literal, field, _, _ in string.Formatter().parse(template)]
    except ValueError as e:
        raise SafeJaxError(f"subject format {template!r} is not a template: {e}") from None
    fields = [field for _, field in parts if field is not None]
    if sorted(fields) != ["caption", "subjects"]:
        raise SafeJaxError(f"subject format must be plain, prefix or a template with {{subjects}} and {{caption}} "
                           f"once each, got {template!r}")
    return parts


def _merge(spans: list[Span]) -> list[Span]:
    """Overlapping spans as one ("Boris Johnson" and "Johnson"); touching ones stay apart."""
    merged: list[Span] = []
    for a, b in sorted(spans):
        if merged and a < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


# ------------------------------------------------------------------------- text → token weights
def subject_token_weights(
    tokenizer: Any,
    captions: Sequence[str],
    subjects: Sequence[Sequence[str]],
    weight: float = DEFAULT_WEIGHT,
    fmt: str = "plain",
    max_length: int = MAX_LENGTH,
) -> TokenWeights:
    """Ids and weights for captions whose subject mentions get ``weight``.

    The caption is tokenised whole (the ids are exactly the unweighted pipeline's for "plain"),
    and a token is weighted when its character span overlaps a subject mention. Mentions cut off
    by the 77-token limit are dropped silently, like the words around them.
    """
    captions = list(captions)
    if len(subjects) != len(captions):
        raise SafeJaxError(f"{len(captions)} captions but {len(subjects)} subject lists")
    if not np.isfinite(weight) or weight < 0:
        raise SafeJaxError(f"subject weight must be a number ≥ 0, got {weight}")
    texts, spans = zip(*(format_caption(c, s, fmt) for c, s in zip(captions, subjects))) if captions else ((), ())
    try:
        enc = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                        return_offsets_mapping=True, return_tensors="np")
    except NotImplementedError:  # a slow (pure Python) tokenizer has no offsets
        raise SafeJaxError("subject weighting needs a fast tokenizer (with offsets), "
                           f"got {type(tokenizer).__name__}") from None
    ids, offsets = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["offset_mapping"])
    weights = np.ones(ids.shape, np.float32)
    for row, row_spans in enumerate(spans):
        start, end = offsets[row, :, 0], offsets[row, :, 1]
        for a, b in row_spans:
            weights[row, (start < b) & (end > a) & (end > start)] = weight
    return TokenWeights(ids, weights)


def fragment_token_weights(
    tokenizer: Any, fragments: Sequence[prompt_syntax.Fragments], max_length: int = MAX_LENGTH
) -> TokenWeights:
    """Ids and weights for ``(text, weight)`` fragments, tokenised one by one as Compel and A1111 do.

    Each row is BOS, the fragments' tokens cut to ``max_length - 2``, EOS, then padding.
    """
    texts = [text for row in fragments for text, _ in row]
    per_text = (tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]
                if texts else [])
    tokens = iter(per_text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(fragments), max_length), pad, np.int32)
    weights = np.ones((len(fragments), max_length), np.float32)
    for row, row_fragments in enumerate(fragments):
        row_ids, row_weights = [], []
        for _, w in row_fragments:
            if not np.isfinite(w):
                raise SafeJaxError(f"token weight must be a finite number, got {w}")
            t = next(tokens)
            row_ids += t
            row_weights += [w] * len(t)
        n = min(len(row_ids), max_length - 2)
        ids[row, : n + 2] = [tokenizer.bos_token_id, *row_ids[:n], tokenizer.eos_token_id]
        weights[row, 1 : n + 1] = row_weights[:n]
    return TokenWeights(ids, weights)


def prompt_token_weights(
    tokenizer: Any,
    prompts: Sequence[str],
    subjects: Sequence[Sequence[str]] | None = None,
    weight: float = DEFAULT_WEIGHT,
    fmt: str = "plain",
    syntax: str | None = None,
    max_length: int = MAX_LENGTH,
) -> TokenWeights:
    """The pipeline's entry: subjects (SAFE), hand-written weights (``syntax``), or neither."""
    prompts = list(prompts)
    if subjects is not None and syntax is not None:
        raise SafeJaxError("give subjects or a prompt syntax, not both (write the subject weights into the prompt)")
    if subjects is not None and (isinstance(subjects, str) or any(isinstance(s, str) for s in subjects)):
        raise SafeJaxError("subjects must be one list of phrases per prompt, e.g. [['Boris Johnson', 'Tower Bridge']]")
    if syntax is not None:
        return fragment_token_weights(tokenizer, [prompt_syntax.parse(p, syntax) for p in prompts], max_length)
    if subjects is not None:
        return subject_token_weights(tokenizer, prompts, subjects, weight, fmt, max_length)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    return TokenWeights(ids, np.ones(ids.shape, np.float32))


# ---------------------------------------------------------------------- weighting (pure, jit-able)
def weighted_embeddings(
    z: jax.Array, z_empty: jax.Array | None, weights: jax.Array, method: str = "compel"
) -> jax.Array:
    """Per-token weights applied to encodings ``z`` [..., T, C]; ``weights`` is [..., T].

    compel: z∅ + w·(z − z∅), and exactly z where w = 1 (Compel's ``build_weighted_embedding_tensor``);
    ``z_empty`` is the encoding of "" ([T, C] or broadcastable). a1111: z·w rescaled so each
    prompt's mean over [T, C] is unchanged (A1111 takes that mean over its whole batch; per prompt
    here, which is the same for a batch of one and keeps prompts independent of their batch-mates).
    """
    if method not in METHODS:
        raise SafeJaxError(f"unknown weighting {method!r} (choose from {', '.join(METHODS)})")
    x, w = z.astype(jnp.float32), jnp.asarray(weights, jnp.float32)[..., None]  # bf16 would round 1.21 to 1.2109
    if method == "compel":
        e = jnp.asarray(z_empty, jnp.float32)
        out = jnp.where(w == 1, x, e + (x - e) * w)
    else:
        xw = x * w
        out = xw * (jnp.mean(x, axis=(-2, -1), keepdims=True) / jnp.mean(xw, axis=(-2, -1), keepdims=True))
    return out.astype(z.dtype)


def count_downweighted(weights: np.ndarray) -> int:
    """The most Compel fragments weighted below 1 in any row (host side; sizes the extra passes)."""
    w = np.asarray(weights)
    down = w < 1
    prev = np.concatenate([np.ones_like(w[..., :1]), w[..., :-1]], axis=-1)
    return int((down & (w != prev)).sum(-1).max()) if w.size else 0


def downweight_masks(weights: jax.Array, num_fragments: int) -> tuple[jax.Array, jax.Array]:
    """For each of ``num_fragments`` runs of equal weight < 1: a keep-mask [B, K, T] and its λ [B, K].

    A run is what Compel fuses into one fragment. Rows with fewer runs get all-keep masks and λ = 0,
    which add nothing to the blend. λ = tan((1 − w)·π/2), written cot(w·π/2) for float32 accuracy
    near w = 0 (Compel clamps w at 1e-5 first). A run that reaches the last text slot is taken to be
    cut off by the token limit, and then Compel's range search masks the EOS after it too; the one
    case this gets wrong is a fragment ending exactly there (only the EOS row of z_wo differs).
    """
    down = weights < 1
    prev = jnp.concatenate([jnp.ones_like(weights[:, :1]), weights[:, :-1]], axis=1)
    run = jnp.where(down, jnp.cumsum(down & (weights != prev), axis=1), 0)  # 1, 2, … inside runs
    k = jnp.arange(1, num_fragments + 1)[None, :, None]
    in_run = run[:, None, :] == k  # [B, K, T]
    present = in_run.any(-1)
    w = jnp.max(jnp.where(in_run, weights[:, None, :], -1.0), axis=-1)
    lam = jnp.where(present, 1.0 / jnp.tan(jnp.maximum(w, 1e-5) * (jnp.pi / 2)), 0.0)
    masked = in_run.at[:, :, -1].set(in_run[:, :, -1] | in_run[:, :, -2])  # the EOS after a cut-off run
    return ~masked, lam.astype(weights.dtype)


def blend_downweighted(z_weighted: jax.Array, z_without: jax.Array, lambdas: jax.Array) -> jax.Array:
    """Compel's lerp towards the prompt without each down-weighted fragment: (z' + Σλ_k z_k)/(1 + Σλ_k).

    ``z_weighted`` [B, T, C], ``z_without`` [B, K, T, C] (already weighted), ``lambdas`` [B, K].
    """
    total = 1.0 + lambdas.sum(-1, keepdims=True)
    share = jnp.concatenate([jnp.ones_like(total), lambdas], axis=-1) / total  # Compel normalises, then sums
    stacked = jnp.concatenate([z_weighted[:, None], z_without], axis=1).astype(jnp.float32)
    # a plain weighted sum, not einsum: a dot may run at reduced precision on GPU/TPU
    return (share.astype(jnp.float32)[:, :, None, None] * stacked).sum(1).astype(z_weighted.dtype)


def encode_weighted(
    encode: Callable[..., jax.Array],
    ids: jax.Array,
    weights: jax.Array,
    z_empty: jax.Array,
    method: str = "compel",
    num_downweighted: int = 0,
) -> jax.Array:
    """The weighted conditioning [B, T, C] from ids and weights, with Compel's w < 1 blend.

    ``encode(ids)`` / ``encode(ids, attention_mask=m)`` runs the text encoder ([N, T] → [N, T, C]).
    ``num_downweighted`` (static; ``count_downweighted`` on the host) sets how many masked
    re-encodings each prompt gets; 0 skips the blend, which is exact whenever all weights ≥ 1.
    """
    z = encode(ids)
    out = weighted_embeddings(z, z_empty, weights, method)
    if method != "compel" or num_downweighted == 0:
        return out
    b, t = ids.shape
    keep, lambdas = downweight_masks(weights, num_downweighted)
    k = num_downweighted
    z_without = encode(jnp.repeat(ids, k, axis=0), attention_mask=keep.reshape(b * k, t)).reshape(b, k, t, -1)
    z_without = weighted_embeddings(z_without, z_empty, weights[:, None, :], method)
    return blend_downweighted(out, z_without, lambdas)
