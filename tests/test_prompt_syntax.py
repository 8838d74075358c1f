"""Hand-written prompt weights: our parsers give the fragments, token ids and weights the tools give."""

from __future__ import annotations

import numpy as np
import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.text import conditioning as cond
from safe_jax.text import tokenizer as tok
from safe_jax.text.prompt_syntax import parse, parse_a1111, parse_compel

COMPEL_PROMPTS = [
    "(Boris Johnson)++ on Tower Bridge",
    "a (red)1.3 bus",
    "(crowd)0.5 at a rally",
    "word- and word+ and well-known+",
    "(a b)-- c, d.e",
    "London's mayor (Boris Johnson)++ gives a big thumbs-up on (Tower Bridge)++.",
    "a (b (c (d)1.2)0.8)-- e",
    "(red)0.5 (blue)0.5 car",
    "x \\(y\\) (z) a(red)1.3",
    "(unbalanced and a + b",
    '"a quoted"++ thing, (1.5 m)+',
    "(x)-1 (x)2 (x).5 (x)+++--",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tok.tiny_tokenizer()


def test_compel_fragments_match_compel():
    prompt_parser = pytest.importorskip("compel.prompt_parser")
    parser = prompt_parser.PromptParser()
    for prompt in COMPEL_PROMPTS:
        (flat,) = parser.parse_conjunction(prompt).prompts
        assert parse_compel(prompt) == [(f.text, f.weight) for f in flat.children], prompt


def test_compel_token_weights_match_compel(tokenizer):
    """Ids and per-token weights as Compel's EmbeddingsProvider builds them (before any encoding)."""
    compel = pytest.importorskip("compel")
    provider = compel.EmbeddingsProvider(tokenizer=tokenizer, text_encoder=None, device="cpu")
    long = " ".join(["(crowd)0.7 of people"] * 30)  # past 77 tokens
    prompts = COMPEL_PROMPTS + [long]
    ours = cond.fragment_token_weights(tokenizer, [parse_compel(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        fragments = parse_compel(prompt)
        ids, weights, _ = provider.get_token_ids_and_expand_weights([t for t, _ in fragments], [w for _, w in fragments],
                                                                    device="cpu")
        np.testing.assert_array_equal(ours.ids[row], ids.numpy(), err_msg=prompt)
        np.testing.assert_array_equal(ours.weights[row], weights.numpy(), err_msg=prompt)


def test_compel_weights_by_example(tokenizer):
    assert parse_compel("(Boris Johnson)++ on Tower Bridge") == [("Boris Johnson", 1.1**2), ("on Tower Bridge", 1.0)]
    assert parse_compel("word-") == [("word", 0.9)]
    assert parse_compel("(a b)--") == [("a b", 0.9**2)]
    assert parse_compel("a (red)1.3 bus") == [("a", 1.0), ("red", 1.3), ("bus", 1.0)]
    ids, weights = cond.fragment_token_weights(tokenizer, [parse_compel("(Boris Johnson)++ on Tower Bridge")])
    words = tokenizer.convert_ids_to_tokens(ids[0, :7].tolist())
    assert words == ["<|startoftext|>", "boris</w>", "johnson</w>", "on</w>", "tower</w>", "bridge</w>", "<|endoftext|>"]
    np.testing.assert_allclose(weights[0, :7], [1, 1.21, 1.21, 1, 1, 1, 1], rtol=1e-6)
    assert (weights[0, 7:] == 1).all()


@pytest.mark.parametrize("prompt", ["(a, b).blend(1, 1)", "(a, b).and()", "a cat.swap(dog)", "(x).attend(1.2)",
                                    "withLora(style, 0.5) a cat"])
def test_compel_operators_beyond_weights_are_refused(prompt):
    with pytest.raises(SafeJaxError, match="not supported"):
        parse_compel(prompt)


def test_a1111_documented_examples():
    """The examples in the docstring of AUTOMATIC1111's parse_prompt_attention, to the last bit."""
    assert parse_a1111("normal text") == [("normal text", 1.0)]
    assert parse_a1111("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_a1111("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_a1111("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_a1111("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_a1111("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]


def test_a1111_rules():
    assert parse_a1111("(word:1.3)") == [("word", 1.3)]
    assert parse_a1111("( word : 0.5 )") == [(" word ", 0.5)]
    assert parse_a1111("[word]") == [("word", 1 / 1.1)]
    assert parse_a1111("[[word]]") == [("word", (1 / 1.1) ** 2)]
    assert parse_a1111("((word))") == [("word", 1.1 * 1.1)]
    assert parse_a1111("((a:1.5) b)") == [("a", 1.5 * 1.1), (" b", 1.1)]
    assert parse_a1111("a \\\\ b \\[c\\] d:e") == [("a \\ b [c] d:e", 1.0)]
    assert parse_a1111("x:1.2) y]") == [("x:1.2) y]", 1.0)]  # closers without openers are text
    assert parse_a1111("") == [("", 1.0)]
    with pytest.raises(SafeJaxError, match="BREAK"):
        parse_a1111("a cat BREAK a dog")
    with pytest.raises(SafeJaxError, match="bad weight"):
        parse_a1111("(a:1.2.3)")


def test_a1111_token_weights(tokenizer):
    """Each fragment tokenised on its own (A1111's tokenize_line), multi-token words all weighted."""
    ids, weights = cond.fragment_token_weights(tokenizer, [parse_a1111("a photo of (Kinnockesque:1.3) [crowds]")])
    n = int(np.argmax(ids[0] == tokenizer.eos_token_id))
    word = tokenizer("Kinnockesque", add_special_tokens=False)["input_ids"]
    assert len(word) > 1
    np.testing.assert_array_equal(ids[0, 4:4 + len(word)], word)
    np.testing.assert_allclose(weights[0, :n + 1], [1, 1, 1, 1] + [1.3] * len(word) + [1 / 1.1, 1], rtol=1e-6)


def test_parse_dispatch():
    assert parse("(a)+", "compel") == [("a", 1.1)]
    assert parse("(a)", "a1111") == [("a", 1.1)]
    with pytest.raises(SafeJaxError, match="unknown prompt syntax"):
        parse("a", "midjourney")
