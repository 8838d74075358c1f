"""SAFE part 1: subject token weights, and weighted embeddings equal to Compel's and A1111's."""

from __future__ import annotations

import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2

from safe_jax.errors import SafeJaxError
from safe_jax.sampling.stable_diffusion import StableDiffusion
from safe_jax.text import conditioning as cond
from safe_jax.text import tokenizer as tok

CAPTION = "London's mayor Boris Johnson gives a big thumbs up to photographers on Tower Bridge."


@pytest.fixture(scope="module")
def tokenizer():
    return tok.tiny_tokenizer()


def _weighted_words(tokenizer, ids, weights, row=0) -> list[tuple[str, float]]:
    words = tokenizer.convert_ids_to_tokens(ids[row].tolist())
    return [(w.removesuffix("</w>"), round(float(x), 4)) for w, x in zip(words, weights[row]) if x != 1]


# ------------------------------------------------------------------------------ token positions
def test_subjects_map_to_tokens_case_insensitively_and_every_mention(tokenizer):
    caption = "BORIS JOHNSON met boris johnson's wife; Johnson spoke. Johnsonville is elsewhere."
    ids, weights = cond.subject_token_weights(tokenizer, [caption], [["Boris Johnson", "johnson"]], weight=1.21)
    np.testing.assert_array_equal(ids, tok.tokenize(tokenizer, [caption]))  # plain: the pipeline's own ids
    assert _weighted_words(tokenizer, ids, weights) == [("boris", 1.21), ("johnson", 1.21), ("boris", 1.21),
                                                         ("johnson", 1.21), ("johnson", 1.21)]


def test_multi_token_words_are_weighted_whole(tokenizer):
    caption = "Neil Kinnockesque speech in Llanfairpwllgwyngyll"
    ids, weights = cond.subject_token_weights(tokenizer, [caption], [["kinnockesque", "Llanfairpwllgwyngyll"]], 1.5)
    n_words = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in ("Kinnockesque", "Llanfairpwllgwyngyll")]
    assert min(n_words) > 1 and (weights == 1.5).sum() == sum(n_words)
    assert weights[0, 1] == 1 and weights[0, 2] == 1.5 and weights[0, 2 + n_words[0]] == 1  # "neil" and "speech" not


def test_run_together_and_unfound_subjects(tokenizer):
    caption = "Crowds gather on Tower Bridge as the Prime Minister arrives"
    ids, weights = cond.subject_token_weights(tokenizer, [caption], [["TowerBridge", "prime-minister", "Paris"]], 1.21)
    assert [w for w, _ in _weighted_words(tokenizer, ids, weights)] == ["tower", "bridge", "prime", "minister"]
    assert cond.find_mentions("concatenate the cat", "cat") == [(16, 19)]  # whole words only


def test_truncation_drops_late_mentions_silently(tokenizer):
    caption = "Johnson " + "and the crowd " * 30 + "Johnson at the end"
    ids, weights = cond.subject_token_weights(tokenizer, [caption], [["Johnson"]], 1.21)
    assert ids.shape == weights.shape == (1, 77) and ids.dtype == np.int32 and weights.dtype == np.float32
    assert np.flatnonzero(weights[0] != 1).tolist() == [1]  # the first mention only; no error


def test_prefix_format_weights_the_prefix_and_the_caption(tokenizer):
    caption = "The mayor waves on Tower Bridge."
    text, spans = cond.format_caption(caption, ["the mayor", "Tower Bridge"], "prefix")
    assert text == "A photo of the mayor, Tower Bridge. The mayor waves on Tower Bridge."
    assert [text[a:b] for a, b in spans] == ["the mayor", "Tower Bridge", "The mayor", "Tower Bridge"]
    ids, weights = cond.subject_token_weights(tokenizer, [caption], [["the mayor", "Tower Bridge"]], 1.21, "prefix")
    assert [w for w, _ in _weighted_words(tokenizer, ids, weights)] == ["the", "mayor", "tower", "bridge"] * 2
    # a template of one's own; its words ("photo", "of") are never weighted even when a subject says so
    text, spans = cond.format_caption("a photo of a photo", ["photo"], "{caption} -- subjects: {subjects}")
    assert text == "a photo of a photo -- subjects: photo" and len(spans) == 3
    assert cond.format_caption(caption, [], "prefix") == (caption, [])  # no subjects, no prefix
    with pytest.raises(SafeJaxError, match="subject format"):
        cond.format_caption(caption, ["x"], "A photo of {things}. {caption}")


def test_token_weight_input_errors(tokenizer):
    with pytest.raises(SafeJaxError, match="2 captions but 1 subject lists"):
        cond.subject_token_weights(tokenizer, ["a", "b"], [["a"]])
    with pytest.raises(SafeJaxError, match="one list of phrases per prompt"):
        cond.prompt_token_weights(tokenizer, ["a cat"], ["cat"])
    with pytest.raises(SafeJaxError, match="≥ 0"):
        cond.subject_token_weights(tokenizer, ["a cat"], [["cat"]], weight=-1.0)
    with pytest.raises(SafeJaxError, match="not both"):
        cond.prompt_token_weights(tokenizer, ["a cat"], [["cat"]], syntax="compel")


# ------------------------------------------------------------------------------ the formulas
def test_formulas_on_numbers():
    rng = np.random.default_rng(0)
    z, e = rng.standard_normal((2, 5, 3)).astype(np.float32), rng.standard_normal((1, 5, 3)).astype(np.float32)
    w = np.array([[1, 1.21, 1, 0.5, 1], [1, 1, 1, 1, 1]], np.float32)
    out = np.asarray(cond.weighted_embeddings(jnp.asarray(z), jnp.asarray(e), jnp.asarray(w), "compel"))
    np.testing.assert_allclose(out, e + w[..., None] * (z - e), rtol=1e-6, atol=1e-6)
    assert np.array_equal(out[1], z[1]) and np.array_equal(out[0, 0], z[0, 0])  # w = 1 is exactly z
    out = np.asarray(cond.weighted_embeddings(jnp.asarray(z), None, jnp.asarray(w), "a1111"))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), z.mean(axis=(1, 2)), rtol=1e-5)
    assert np.array_equal(out[1], z[1])
    keep, lam = cond.downweight_masks(jnp.asarray([[1, 0.5, 0.5, 1, 0.9, 0.5, 1]], jnp.float32), 4)
    # three runs (Compel's fragments); the last reaches the last text slot, so its EOS is masked too
    assert np.asarray(~keep).astype(int).tolist() == [[[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0],
                                                       [0, 0, 0, 0, 0, 1, 1], [0] * 7]]
    np.testing.assert_allclose(np.asarray(lam), [[1.0, np.tan(0.05 * np.pi), 1.0, 0.0]], rtol=1e-5)
    assert cond.count_downweighted(np.array([[1, 0.5, 0.5, 1, 0.9, 0.5, 1], [1, 1, 1, 1, 1, 1, 1]])) == 3
    with pytest.raises(SafeJaxError, match="unknown weighting"):
        cond.weighted_embeddings(jnp.asarray(z), None, jnp.asarray(w), "midjourney")


# ------------------------------------------------------------------------------ against compel
@pytest.fixture(scope="module")
def loaded(tiny_torch_folder):
    folder, torch_pipe = tiny_torch_folder
    pipe, params = StableDiffusion.from_pretrained(folder)
    return pipe, params, torch_pipe


@pytest.fixture(scope="module")
def compel_fn(loaded):
    compel = pytest.importorskip("compel")
    _, _, torch_pipe = loaded
    c = compel.Compel(tokenizer=torch_pipe.tokenizer, text_encoder=torch_pipe.text_encoder)
    return lambda prompt: c(prompt)[0].numpy()


def test_text_encoder_attention_mask_matches_transformers(loaded):
    pipe, params, torch_pipe = loaded
    ids = pipe.tokenize(["a red bus on Tower Bridge", "a cat"])
    mask = np.ones_like(ids)
    mask[0, 2:4] = 0
    ours = pipe.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids), attention_mask=mask)
    with torch.no_grad():
        ref = torch_pipe.text_encoder(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    assert rel_l2(ours["last_hidden_state"], ref.last_hidden_state.numpy()) <= 1e-5


COMPEL_TABLE = [
    "(Boris Johnson)++ on Tower Bridge",
    "a (red)1.3 bus",
    "(crowd)0.5 at a rally",
    "(a b)-- c, d.e",
    "a (red)0.5 (blue)0.5 car, (x)0.2 and (y)0 z",
    "London's mayor (Boris Johnson)++ gives a (big)0.8 thumbs up on (Tower Bridge)1.4641.",
    "no weights at all",
    "(protesters)0.7 " + "march past the palace " * 16,  # truncated, the down-weighted part is not
    "march past the palace " * 18 + "a b (protesters and police)0.5 end",  # a down-weighted part cut off
]


def test_compel_syntax_matches_compel(loaded, compel_fn):
    pipe, params, _ = loaded
    ours = np.asarray(pipe.encode_prompt(params, COMPEL_TABLE, prompt_syntax="compel"))  # one batch, one call
    for row, prompt in enumerate(COMPEL_TABLE):
        assert rel_l2(ours[row], compel_fn(prompt)) <= 1e-5, prompt
    # the weights did something: w > 1 and w < 1 both move the encoding away from the plain one
    plain = np.asarray(pipe.encode_prompt(params, ["Boris Johnson on Tower Bridge", "crowd at a rally"]))
    assert rel_l2(ours[0], plain[0]) > 1e-3 and rel_l2(ours[2], plain[1]) > 1e-3


def _compel_prompt(text: str, spans: list[tuple[int, int]], op: str) -> str:
    for a, b in reversed(spans):
        text = f"{text[:a]}({text[a:b]}){op} {text[b:]}"
    return text


@pytest.mark.parametrize("weight,op", [(1.1**2, "++"), (0.5, "0.5")])
@pytest.mark.parametrize("fmt", ["plain", "prefix"])
def test_subject_weighting_matches_compel(loaded, compel_fn, weight, op, fmt):
    pipe, params, _ = loaded
    captions = [CAPTION, "Protesters and police face off as protesters march to Parliament"]
    subjects = [["Boris Johnson", "Tower Bridge"], ["protesters", "police"]]
    ours = np.asarray(pipe.encode_prompt(params, captions, subjects=subjects, subject_weight=weight,
                                         subject_format=fmt))
    for row, (caption, phrases) in enumerate(zip(captions, subjects)):
        prompt = _compel_prompt(*cond.format_caption(caption, phrases, fmt), op)
        assert rel_l2(ours[row], compel_fn(prompt)) <= 1e-5, prompt


# ------------------------------------------------------------------------------ against A1111's formula
def test_a1111_matches_its_formula(loaded):
    """z·w with the mean over the prompt's [77, C] restored, on the torch encoder, written out here."""
    pipe, params, torch_pipe = loaded
    tk = torch_pipe.tokenizer
    prompts = ["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "(Boris Johnson:1.21) on [Tower Bridge]"]
    ours = np.asarray(pipe.encode_prompt(params, prompts, weighting="a1111", prompt_syntax="a1111"))
    subject_ours = np.asarray(pipe.encode_prompt(params, [CAPTION], subjects=[["Boris Johnson"]], weighting="a1111"))
    cases = [(prompts[0], [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                           (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
             (prompts[1], [("Boris Johnson", 1.21), (" on ", 1.0), ("Tower Bridge", 1 / 1.1)]),
             (CAPTION, [("London's mayor", 1.0), ("Boris Johnson", 1.21), (CAPTION[28:], 1.0)])]
    for got, (prompt, fragments) in zip([ours[0], ours[1], subject_ours[0]], cases):
        ids, mult = [tk.bos_token_id], [1.0]
        for text, w in fragments:
            t = tk(text, add_special_tokens=False)["input_ids"]
            ids, mult = ids + t, mult + [w] * len(t)
        ids, mult = ids + [tk.eos_token_id] * (77 - len(ids)), mult + [1.0] * (77 - len(mult))
        with torch.no_grad():
            z = torch_pipe.text_encoder(torch.tensor([ids])).last_hidden_state[0].double()
        zw = z * torch.tensor(mult, dtype=torch.float64)[:, None]
        ref = (zw * (z.mean() / zw.mean())).numpy()
        assert rel_l2(got, ref) <= 1e-5, prompt


# ------------------------------------------------------------------------------ pipeline and CLI
def test_generate_with_subjects(loaded):
    pipe, params, _ = loaded
    prompts, subjects = [CAPTION, "a photo of a cat"], [["Boris Johnson", "Tower Bridge"], ["cat"]]
    kw = dict(num_steps=2, seed=3)
    plain = pipe.generate(params, prompts, **kw)
    weighted = pipe.generate(params, prompts, subjects=subjects, subject_weight=1.4641, **kw)
    same = pipe.generate(params, prompts, subjects=subjects, subject_weight=1.0, **kw)
    assert np.array_equal(same, plain)
    change = np.abs(weighted.astype(int) - plain).mean(axis=(1, 2, 3))
    assert (change > 0.1).all(), change  # both images move (random tiny weights, 2 steps: a small move)
    with pytest.raises(SafeJaxError, match="2 captions but 1"):
        pipe.generate(params, prompts, subjects=[["cat"]], **kw)
    with pytest.raises(SafeJaxError, match="unknown weighting"):
        pipe.encode_prompt(params, prompts, weighting="sum")


def test_cli_subjects(tmp_path, monkeypatch):
    from PIL import Image

    from launch import generate

    assert generate.resolve_subjects(None, ["a"]) is None
    assert generate.resolve_subjects(["none"], ["a", "b"]) is None
    assert generate.resolve_subjects(["Boris Johnson; Tower Bridge ;"], ["a", "b"]) == [["Boris Johnson", "Tower Bridge"]] * 2
    with pytest.raises(SafeJaxError, match="once per prompt"):
        generate.resolve_subjects(["x", "y"], ["a", "b", "c"])
    calls = []
    fake = types.ModuleType("safe_jax.text.subjects")
    fake.extract = lambda captions: calls.append(list(captions)) or [["Boris Johnson"] for _ in captions]
    monkeypatch.setitem(sys.modules, "safe_jax.text.subjects", fake)
    assert generate.resolve_subjects(["auto", "none"], ["Boris Johnson waves", "b"]) == [["Boris Johnson"], []]
    assert calls == [["Boris Johnson waves"]]

    code = generate.main(["--model", "tiny", "--prompt", "Boris Johnson waves on Tower Bridge", "--steps", "2",
                          "--subjects", "auto", "--subject-weight", "1.331", "--subject-format", "prefix",
                          "--out", str(tmp_path)])
    assert code == 0
    (png,) = tmp_path.glob("*.png")
    settings = json.loads(Image.open(png).text["parameters"])
    assert settings["subjects"] == ["Boris Johnson"] and settings["subject_weight"] == 1.331
    assert settings["weighting"] == "compel" and settings["subject_format"] == "prefix"
    assert generate.main(["--prompt", "a", "--subjects", "a", "--subject-format", "{oops}", "--out", str(tmp_path)]) == 2
