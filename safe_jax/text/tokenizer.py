"""The CLIP tokenizer, loaded from a diffusers ``tokenizer/`` folder or built from CLIP's own BPE data.

Stable Diffusion only ever sees token ids, so the tokenizer must be byte-for-byte the one the text
encoder was trained with. For real checkpoints that is the ``tokenizer/`` folder next to the
weights. For the ``tiny`` preset (and tests) we rebuild OpenAI CLIP's vocabulary offline from
``bpe_simple_vocab_16e6.txt.gz``, which the ``open-clip-torch`` package ships as package data;
we read that file only and never import ``open_clip`` (it would pull in torchvision).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

from safe_jax.errors import SafeJaxError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocab: 256 bytes ×2 (with and without </w>), merges, 2 specials

# What openai/clip-vit-large-patch14 (SD 1.x's tokenizer/ folder) declares; SD 1.x pads with EOS.
_TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MODEL_MAX_LENGTH,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
    "do_lower_case": True,
    "add_prefix_space": False,
    "errors": "replace",
}
_SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The CLIP tokenizer saved in ``folder`` (a diffusers ``tokenizer/`` folder), loaded offline.

    In transformers 5 ``CLIPTokenizer`` is the Rust-backed (fast) tokenizer and
    ``CLIPTokenizerFast`` an alias of it; it loads from tokenizer.json (what transformers 5 saves)
    or from vocab.json + merges.txt (what hub SD checkpoints and transformers 4 hold).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SafeJaxError(f"tokenizer folder {folder} does not exist")
    has = lambda name: (folder / name).is_file()
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        missing = [name for name in ("vocab.json", "merges.txt") if not has(name)]
        raise SafeJaxError(f"tokenizer folder {folder} lacks {' and '.join(missing)} (and has no tokenizer.json)")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # corrupt json, bad merges: one line, with the cause
        raise SafeJaxError(f"cannot load the CLIP tokenizer in {folder}: {e}") from e


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Write ``tokenizer`` as a diffusers ``tokenizer/`` folder.

    transformers 5 writes only tokenizer.json; we add vocab.json + merges.txt (from the BPE model
    itself) so transformers 4's slow CLIPTokenizer, which diffusers pipelines name, loads it too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not (folder / "vocab.json").is_file():
        backend.model.save(str(folder))  # BPE: vocab.json and merges.txt


def tokenize(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int = MODEL_MAX_LENGTH
) -> np.ndarray:
    """Token ids [B, max_length] int32, padded and truncated as diffusers' StableDiffusionPipeline does."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def tiny_tokenizer(pad_token: str | None = None) -> PreTrainedTokenizerBase:
    """OpenAI CLIP's tokenizer (as SD 1.x uses it), built offline from the bundled BPE data;
    ``pad_token="!"`` gives SDXL's second tokenizer (the same BPE, padded with "!")."""
    tokenizer = load_tokenizer(bundled_clip_vocab_dir())
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


@functools.cache
def bundled_clip_vocab_dir() -> Path:
    """A folder holding CLIP's vocab.json, merges.txt and tokenizer configs, built once and cached.

    The folder lives under ``$XDG_CACHE_HOME/safe_jax/clip_vocab`` (default ``~/.cache``). It is
    written into a temporary sibling and renamed into place, so concurrent builders (pytest -n)
    never see a half-written folder.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "safe_jax" / "clip_vocab"
    if target.is_dir():
        return target
    vocab, merges = _clip_vocab_and_merges(_bpe_data_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".clip_vocab-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary shared data
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
        )
        (tmp / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(_SPECIAL_TOKENS_MAP, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process got there first; its folder is identical
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bpe_data_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise SafeJaxError(
        "CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) is not installed; "
        "run: pip install --no-deps open-clip-torch"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable character table (same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """The encoder exactly as OpenAI CLIP's SimpleTokenizer builds it (so ids match the real ones)."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a header
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != _VOCAB_SIZE or len(set(tokens)) != _VOCAB_SIZE:
        raise SafeJaxError(f"{bpe_path} is not CLIP's BPE data: it gives {len(set(tokens))} tokens")
    return {token: i for i, token in enumerate(tokens)}, merges
