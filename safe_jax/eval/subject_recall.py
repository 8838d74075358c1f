"""Subject recall: does the picture show the caption's key subjects? (Our design, not the paper's.)

SAFE claims to ground a caption's subjects better. FID and caption scores see the whole picture;
this asks about each subject. For every subject s of a caption, the judge CLIP ranks the prompt
"a photo of {s}" against ``distractors`` prompts made from subjects of *other* captions (of the
same kind where the dataset says the kind, so a person competes with people); recall@1 is the
share of subjects ranked first, MRR the mean of 1/rank. Chance is 1/(distractors + 1).

Distractors are drawn with a generator seeded by the prompt id, so every model and seed of one
prompt faces the same candidates, and a re-run the same ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from safe_jax.eval.prompts import EvalPrompt, Subject

TEMPLATE = "a photo of {}"
DISTRACTORS = 9


@dataclass(frozen=True)
class Candidates:
    subject: Subject
    texts: tuple[str, ...]  # the true subject first, then the distractors


def _rng(prompt_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "little"))


def candidate_sets(prompts: Sequence[EvalPrompt], distractors: int = DISTRACTORS) -> dict[str, list[Candidates]]:
    """Per prompt id, one candidate set per subject (prompts without subjects get none)."""
    pool: dict[str, set[str]] = {}
    for prompt in prompts:
        for s in prompt.subjects or ():
            pool.setdefault(s.kind or "", set()).add(s.text)
    everything = sorted(set().union(*pool.values())) if pool else []
    out = {}
    for prompt in prompts:
        own = {s.text.lower() for s in prompt.subjects or ()}
        rng = _rng(prompt.id)
        sets = []
        for subject in prompt.subjects or ():
            same_kind = sorted(t for t in pool.get(subject.kind or "", ()) if t.lower() not in own)
            choices = same_kind if subject.kind and len(same_kind) >= distractors else \
                [t for t in everything if t.lower() not in own]
            if not choices:
                continue
            picked = rng.choice(len(choices), size=min(distractors, len(choices)), replace=False)
            sets.append(Candidates(subject, (subject.text, *(choices[i] for i in sorted(picked)))))
        out[prompt.id] = sets
    return out


def recall_scores(image_embeds: np.ndarray, sets: Sequence[Candidates],
                  text_embeds: Callable[[Sequence[str]], np.ndarray]) -> dict[str, float]:
    """recall@1 and MRR of one image (L2-normalised embedding) over its candidate sets, overall and per kind.

    ``text_embeds(texts)`` returns L2-normalised embeddings of ``TEMPLATE.format(text)`` prompts.
    A tie with the true subject counts against it (rank = 1 + candidates scoring at least as high).
    """
    if not sets:
        return {}
    hits, reciprocal, by_kind = [], [], {}
    for candidates in sets:
        sims = text_embeds(candidates.texts) @ np.asarray(image_embeds, np.float32)
        rank = 1 + int(np.sum(sims[1:] >= sims[0]))
        hits.append(float(rank == 1))
        reciprocal.append(1.0 / rank)
        if candidates.subject.kind:
            by_kind.setdefault(candidates.subject.kind, []).append(float(rank == 1))
    values = {"subject_recall@1": float(np.mean(hits)), "subject_mrr": float(np.mean(reciprocal))}
    values.update({f"subject_recall@1.{kind}": float(np.mean(v)) for kind, v in sorted(by_kind.items())})
    return values
