"""OpenAI CLIP's BPE tokenizer, cut down to the words of the world.

CLIP's vocabulary has 49 408 tokens; a token-embedding table that size would be most of a small
model's weights (49 408 × 128 floats = 12.6 MB in fp16 per text tower, and the world ships three)
while its captions use a few hundred of them. So the world's text towers use the same BPE with
only the merges its texts need: every word of those texts is split into exactly the tokens the
full tokenizer gives (checked when built), words outside them fall back to shorter pieces (down
to single bytes, all of which are kept), and ids are renumbered 0…V−1 with the start and end
tokens last. The result is an ordinary CLIP tokenizer folder (vocab.json + merges.txt) that
transformers' ``CLIPTokenizer`` and diffusers pipelines load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from safe_jax.errors import SafeJaxError
from safe_jax.text import tokenizer as tok

_WORD_END = "</w>"


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one pre-tokenised ``word``, in the order it applies them."""
    symbols = list(word[:-1]) + [word[-1] + _WORD_END]
    used = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def build_world_tokenizer(texts: Iterable[str], folder: str | Path):
    """Write into ``folder`` CLIP's tokenizer restricted to the words of ``texts``; return it loaded.

    Removing merges a word never applies cannot change how BPE splits that word (at each step it
    applies the best-ranked pair present, and a removed merge was never present when it could
    have been chosen), so ``texts`` tokenise exactly as with the full tokenizer; this is checked.
    """
    texts = list(texts)
    full = tok.tiny_tokenizer()
    source = tok.bundled_clip_vocab_dir()
    merges = (source / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
    backend = full.backend_tokenizer
    words = {w for text in texts
             for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))}
    used = set()
    for word in words:
        used.update(_bpe_merges_used(word, ranks))
    kept = sorted(used, key=ranks.__getitem__)

    full_vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(full_vocab, key=full_vocab.__getitem__)
    tokens = by_id[:512] + ["".join(m) for m in kept] + [tok.BOS, tok.EOS]  # bytes, bytes + </w>, merges
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in kept),
                                       encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text((source / name).read_text(encoding="utf-8"), encoding="utf-8")
    small = tok.load_tokenizer(folder)
    for text in texts:
        if small.tokenize(text) != full.tokenize(text):
            raise SafeJaxError(f"world tokenizer: {text!r} tokenises differently from CLIP's own BPE")
    return small


def text_config_ids(tokenizer) -> dict[str, int]:
    """The token-id fields of a CLIP text config for ``tokenizer`` (end-of-text pooling; pad = end)."""
    eos = tokenizer.convert_tokens_to_ids(tok.EOS)
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.convert_tokens_to_ids(tok.BOS),
            "eos_token_id": eos, "pad_token_id": eos}
