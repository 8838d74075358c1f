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
    # None: the encoder's ``encoded`` output (its last layer, normalised, as SD 1.x/2.x use it);
    # k < 0: ``hidden_states[k]``, un-normalised (SDXL conditions on k = -2, the penultimate layer).
    hidden_layer: int | None = None

    @property
    def max_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    def text_params(self, params: dict) -> Any:
        """The part of a pipeline's parameter tree this conditioner reads."""
        return params["text_encoder"]

    def pooled_token_ids(self, prompts: Sequence[str], ids: np.ndarray, syntax: str | None) -> np.ndarray:
        """The ids a pooled embedding reads: ``ids`` (SD 1.x/2.x pools nothing; see
        ``DualTextConditioner.pooled_token_ids``)."""
        return ids

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
        out = self.text_encoder.apply({"params": text_params}, ids, attention_mask=attention_mask)
        return out["encoded"] if self.hidden_layer is None else out["hidden_states"][self.hidden_layer]

    def empty(self, text_params: Any) -> jax.Array:
        """z∅, the encoding of "" [1, T, C]: Compel's reference point and the dropped condition of
        classifier-free guidance training. Compute it once per compiled function and pass it on."""
        return self.encode(text_params, jnp.asarray(self.tokenize([""])))

    def __call__(self, text_params: Any, ids: jax.Array, weights: jax.Array, weighting: str = "compel",
                 num_downweighted: int = 0, z_empty: jax.Array | None = None, pooled_ids: Any = None) -> jax.Array:
        """Weighted conditioning [B, T, C] from ids and weights [B, T]. ``num_downweighted`` is
        static (``num_downweighted(weights, weighting)`` on the host, or a training bound).
        ``pooled_ids`` is for SDXL's pooled embedding (``DualTextConditioner``); SD has none."""
        check_weighting(weighting)
        z_empty = self.empty(text_params) if z_empty is None else z_empty
        return cond.encode_weighted(lambda i, attention_mask=None: self.encode(text_params, i, attention_mask),
                                    ids, weights, z_empty, weighting, num_downweighted)


@dataclasses.dataclass(frozen=True, eq=False)
class DualTextConditioner:
    """SDXL's conditioning: two CLIP text encoders, as diffusers' ``StableDiffusionXLPipeline``.

    The UNet reads a dict: ``encoder_hidden_states``, both encoders' penultimate hidden states
    (un-normalised) concatenated along channels, and ``text_embeds``, encoder 2's projected pooled
    output. Subject weights are applied to each encoder's sequence with that encoder's own z∅,
    then concatenated; the pooled embedding stays unweighted, as Compel's SDXL mode
    (``requires_pooled=[False, True]``) does it. The micro-conditioning ``time_ids`` are not text:
    the caller adds them (``with_time_ids``).

    Both tokenizers are CLIP's BPE and differ only in padding (SDXL's second pads with "!"), so
    the host tokenises once with the first and ``second_ids`` re-pads for the second; the pipeline
    checks that assumption when it loads a folder. The same ids and weights therefore drive
    training, sampling and evaluation, whichever the model.
    """

    first: TextConditioner
    second: TextConditioner  # its text_encoder is a CLIPTextModelWithProjection

    @property
    def max_length(self) -> int:
        return self.first.max_length

    @property
    def tokenizer(self) -> Any:
        return self.first.tokenizer

    def text_params(self, params: dict) -> dict:
        return {"text_encoder": params["text_encoder"], "text_encoder_2": params["text_encoder_2"]}

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return self.first.tokenize(prompts)

    def token_weights(self, *args: Any, **kwargs: Any) -> cond.TokenWeights:
        return self.first.token_weights(*args, **kwargs)

    def second_ids(self, ids: jax.Array) -> jax.Array:
        """Tokenizer 2's ids for tokenizer 1's: every slot after the first EOS holds its pad id."""
        eos = self.first.tokenizer.eos_token_id
        seen = jnp.cumsum(ids == eos, axis=-1)
        after = (seen > 1) | ((seen == 1) & (ids != eos))
        return jnp.where(after, self.second.tokenizer.pad_token_id, ids).astype(ids.dtype)

    def pooled(self, text_params: dict, ids: jax.Array) -> jax.Array:
        second = self.second
        return second.text_encoder.apply({"params": text_params["text_encoder_2"]}, self.second_ids(ids))["text_embeds"]

    def encode(self, text_params: dict, ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
        """The plain (unweighted) conditioning: ``encoder_hidden_states`` [B, T, C1 + C2], ``text_embeds``."""
        ids2 = self.second_ids(ids)
        z1 = self.first.encode(text_params["text_encoder"], ids, attention_mask)
        out = self.second.text_encoder.apply({"params": text_params["text_encoder_2"]}, ids2,
                                             attention_mask=attention_mask)
        z2 = out["hidden_states"][self.second.hidden_layer]
        return {"encoder_hidden_states": jnp.concatenate([z1, z2.astype(z1.dtype)], axis=-1),
                "text_embeds": out["text_embeds"]}

    def empty(self, text_params: dict) -> dict:
        return self.encode(text_params, jnp.asarray(self.tokenize([""])))

    def __call__(self, text_params: dict, ids: jax.Array, weights: jax.Array, weighting: str = "compel",
                 num_downweighted: int = 0, z_empty: dict | None = None, pooled_ids: jax.Array | None = None) -> dict:
        """As ``TextConditioner.__call__``; the pooled embedding is encoder 2's plain encoding of
        ``pooled_ids`` (default ``ids``). Compel pools the raw prompt string, weight syntax and
        all, so hand-written Compel prompts pass its tokenisation here (``pooled_token_ids``)."""
        check_weighting(weighting)
        z_empty = self.empty(text_params) if z_empty is None else z_empty
        split = self.first.text_encoder.config.hidden_size
        empties = (z_empty["encoder_hidden_states"][..., :split], z_empty["encoder_hidden_states"][..., split:])
        parts = []
        for conditioner, key, ids_k, z_e in ((self.first, "text_encoder", ids, empties[0]),
                                             (self.second, "text_encoder_2", self.second_ids(ids), empties[1])):
            encode = lambda i, attention_mask=None, c=conditioner, k=key: c.encode(text_params[k], i, attention_mask)
            parts.append(cond.encode_weighted(encode, ids_k, weights, z_e, weighting, num_downweighted))
        return {"encoder_hidden_states": jnp.concatenate([parts[0], parts[1].astype(parts[0].dtype)], axis=-1),
                "text_embeds": self.pooled(text_params, ids if pooled_ids is None else pooled_ids)}

    def pooled_token_ids(self, prompts: Sequence[str], ids: np.ndarray, syntax: str | None) -> np.ndarray:
        """The ids the pooled embedding reads: for Compel syntax its raw prompt text, as Compel's
        ``get_pooled_embeddings`` tokenises it ("(Boris Johnson)++ …" literally); else ``ids``."""
        return self.tokenize(prompts) if syntax == "compel" else ids


def with_time_ids(conditioning: Any, time_ids: Any) -> Any:
    """SDXL's conditioning completed by its micro-conditioning ``time_ids`` [B, 6]; an SD 1.x/2.x
    encoding (an array) is returned unchanged."""
    if not isinstance(conditioning, dict):
        return conditioning
    return {**conditioning, "time_ids": jnp.asarray(time_ids, jnp.float32)}
