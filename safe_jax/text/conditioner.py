"""The one road from captions to what the UNet cross-attends to: tokenise → subject weights →
weighted embedding (SAFE part 1).

Sampling (``StableDiffusion``), the training step and evaluation all call a ``TextConditioner``
and read their settings from one ``SubjectSettings`` (``config.subjects`` in training configs),
so a caption is conditioned the same way wherever it goes. The arithmetic lives in
``conditioning``; this module decides the things that must be decided once: the token length
(the text encoder's ``max_position_embeddings``), the empty-prompt encoding (once per compiled
function) and how many Compel down-weighting passes a batch gets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.text import conditioning as cond

DEFAULT_WEIGHT = cond.DEFAULT_WEIGHT  # 1.1², Compel's "++": the paper's weight


@dataclasses.dataclass(frozen=True)
class SubjectSettings:
    """How subjects weigh: ``weight`` for their tokens, ``weighting`` "compel" (z∅ + w(z − z∅)) or
    "a1111" (z·w, mean restored), ``format`` "plain", "prefix" or a template with {subjects} and
    {caption}. ``max_downweighted`` bounds, in training, the Compel fragments below weight 1 that a
    caption may have (the step is compiled once, so the number of extra text passes is fixed);
    fragments past it are not blended."""

    weight: float = DEFAULT_WEIGHT
    weighting: str = "compel"
    format: str = "plain"
    max_downweighted: int = 8

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
                math.isfinite(self.weight) and self.weight > 0):
            raise SafeJaxError(f"subjects.weight must be a finite number > 0, got {self.weight!r}")
        check_weighting(self.weighting)
        if not isinstance(self.format, str) or not self.format:
            raise SafeJaxError(f"subjects.format must be plain, prefix or a template, got {self.format!r}")
        if isinstance(self.max_downweighted, bool) or not isinstance(self.max_downweighted, int) \
                or self.max_downweighted < 1:
            raise SafeJaxError(f"subjects.max_downweighted must be an integer ≥ 1, got {self.max_downweighted!r}")

    @property
    def training_downweighted(self) -> int:
        """The static number of Compel blend passes a training step compiles: none unless
        subjects are down-weighted (w < 1) with Compel weighting."""
        return self.max_downweighted if self.weighting == "compel" and self.weight < 1 else 0


def check_weighting(weighting: str) -> None:
    if weighting not in cond.METHODS:
        raise SafeJaxError(f"unknown weighting {weighting!r} (choose from {', '.join(cond.METHODS)})")


def num_downweighted(weights: np.ndarray, weighting: str) -> int:
    """How many Compel blend passes ``weights`` [B, T] need (0 for a1111, or when all are ≥ 1):
    the one place that decides it, from concrete weights on the host."""
    check_weighting(weighting)
    return cond.count_downweighted(weights) if weighting == "compel" else 0


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioner:
    """A text encoder (a Flax CLIP text model) and its tokenizer, as one conditioning function.

    Host side: ``token_weights`` turns prompts and their subjects into ids and per-token weights.
    Traceable: ``__call__`` turns ids and weights into the weighted conditioning [B, T, C]; it
    sits inside sampling loops and training steps. Weights are arrays, so prompts and subjects
    change without recompiling.
    """

    text_encoder: Any
    tokenizer: Any

    @property
    def max_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    # ------------------------------------------------------------------ host side
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        from safe_jax.text import tokenizer as tok

        return tok.tokenize(self.tokenizer, list(prompts), self.max_length)

    def token_weights(self, prompts: Sequence[str], subjects: Sequence[Sequence[str]] | None = None,
                      weight: float = DEFAULT_WEIGHT, fmt: str = "plain",
                      syntax: str | None = None) -> cond.TokenWeights:
        """Token ids and per-token weights [B, T] for prompts, their subjects or their weight syntax."""
        return cond.prompt_token_weights(self.tokenizer, prompts, subjects, weight, fmt, syntax, self.max_length)

    # ------------------------------------------------------------------ traceable
    def encode(self, text_params: Any, ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The plain (unweighted) encoding [B, T, C] the UNet reads."""
        return self.text_encoder.apply({"params": text_params}, ids, attention_mask=attention_mask)["encoded"]

    def empty(self, text_params: Any) -> jax.Array:
        """z∅, the encoding of "" [1, T, C]: Compel's reference point and the dropped condition of
        classifier-free guidance training. Compute it once per compiled function and pass it on."""
        return self.encode(text_params, jnp.asarray(self.tokenize([""])))

    def __call__(self, text_params: Any, ids: jax.Array, weights: jax.Array, weighting: str = "compel",
                 num_downweighted: int = 0, z_empty: jax.Array | None = None) -> jax.Array:
        """Weighted conditioning [B, T, C] from ids and weights [B, T]. ``num_downweighted`` is
        static (``num_downweighted(weights, weighting)`` on the host, or a training bound)."""
        check_weighting(weighting)
        z_empty = self.empty(text_params) if z_empty is None else z_empty
        return cond.encode_weighted(lambda i, attention_mask=None: self.encode(text_params, i, attention_mask),
                                    ids, weights, z_empty, weighting, num_downweighted)
