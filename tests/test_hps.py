"""HPS v2 / OpenCLIP against the fixtures that hpsv2's and open_clip's own code wrote
(tests/reference/fixtures_open_clip.py): the checkpoint conversion, the features, the scores,
the tokenizer, the image preprocessing, and the differentiable reward."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2

from safe_jax.errors import SafeJaxError
from safe_jax.eval import hps
from safe_jax.io import open_clip as oc
from safe_jax.models import clip_vision as cv

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "open_clip"
CHECKPOINT = FIXTURES / "hps_tiny.pt"
HEADS = {"vision_heads": 4, "text_heads": 3}  # the toy's; a named model (ViT-H-14) fixes them itself


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURES / "outputs.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def hps_model():
    return oc.load_open_clip(CHECKPOINT, None, **HEADS)


@pytest.fixture(scope="module")
def open_clip_state():
    return oc.read_state_dict(CHECKPOINT)


@functools.partial(jax.jit, static_argnums=0)
def features_and_scores(model, params, pixels, ids, score_pixels):
    """Both towers' projected features and the HPS of the scored pairs, in one compile."""
    image = model.apply({"params": params}, pixels, method="get_image_features")
    text = model.apply({"params": params}, ids, method="get_text_features")
    return image, text, hps.hps_score(model, params, score_pixels, ids[:score_pixels.shape[0]])


def score_sources(ref) -> list[np.ndarray]:
    return [ref[f"score_src_{i}"] for i in range(len(ref["scores"]))]


# ------------------------------------------------------------------------------ the model itself

def test_features_and_scores_match_hpsv2(ref, hps_model):
    model, params = hps_model
    assert model.config.text.num_attention_heads == 3 and model.config.vision.num_attention_heads == 4
    assert model.config.text.hidden_act == model.config.vision.hidden_act == "gelu"
    # Everything from our side of the pipeline: our tokens and our preprocessing of the raw images.
    ids = hps.tokenize(json.loads(str(ref["captions"])))
    score_pixels = hps.preprocess(score_sources(ref), model.config.vision.image_size)
    image, text, scores = features_and_scores(model, params, ref["pixel_values"], ids, score_pixels)
    assert rel_l2(image, ref["image_features"]) <= 1e-5
    assert rel_l2(text, ref["text_features"]) <= 1e-5
    assert rel_l2(scores, ref["scores"]) <= 1e-5  # hpsv2's img_score.score, image file to number


def test_conversion_is_a_bitwise_renaming(open_clip_state):
    config, hf = oc.convert_state_dict(open_clip_state, None, **HEADS)
    width = config.vision.hidden_size
    in_proj = open_clip_state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    layer = "vision_model.encoder.layers.1.self_attn"
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert np.array_equal(hf[f"{layer}.{name}.weight"], in_proj[i * width:(i + 1) * width])
    assert np.array_equal(hf["text_projection.weight"], open_clip_state["text_projection"].T)
    assert np.array_equal(hf["vision_model.embeddings.patch_embedding.weight"], open_clip_state["visual.conv1.weight"])
    assert hf["visual_projection.weight"].dtype == np.float16  # the file's dtype: cast only on load
    model = cv.CLIPModel(config)
    assert set(cv.to_hf_state_dict(cv.from_hf_state_dict(hf, model))) == set(hf)
    assert oc.infer_config(open_clip_state, None, **HEADS, quick_gelu=True).vision.hidden_act == "quick_gelu"
    assert oc.OPEN_CLIP_ARCHS["ViT-L-14-quickgelu"].quick_gelu and oc.OPEN_CLIP_ARCHS["ViT-H-14"].vision_heads == 16


def test_checkpoint_variants_load(tmp_path, open_clip_state, hps_model):
    _, params = hps_model
    tensors = {key: torch.from_numpy(value) for key, value in open_clip_state.items()}
    same = lambda p: jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, p, params))
    # DataParallel's prefix, a saved causal-mask buffer, a bare state dict, bf16 tensors, safetensors.
    variants = {
        "module.pt": {"state_dict": {f"module.{k}": v for k, v in tensors.items()}},
        "mask.pt": {"state_dict": {**tensors, "attn_mask": torch.zeros(77, 77)}, "epoch": 3},
        "bare.bin": tensors,
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        assert same(oc.load_open_clip(tmp_path / name, None, **HEADS)[1]), name
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "hps.safetensors"))
    assert same(oc.load_open_clip(tmp_path / "hps.safetensors", None, **HEADS)[1])
    torch.save({"state_dict": {k: v.bfloat16() for k, v in tensors.items()}}, tmp_path / "bf16.pt")
    assert oc.load_open_clip(tmp_path / "bf16.pt", None, **HEADS)[1]["logit_scale"].dtype == jnp.float32


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(SafeJaxError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_conversion_errors_name_the_tensor(tmp_path, open_clip_state):
    state = dict(open_clip_state)
    missing = {k: v for k, v in state.items() if k != "visual.transformer.resblocks.1.ln_2.bias"}
    one_line_error(r"missing tensor 'visual\.transformer\.resblocks\.1\.ln_2\.bias'$",
                   oc.convert_state_dict, missing, None, **HEADS)
    one_line_error(r"missing tensor 'visual\.conv1\.weight'",
                   oc.convert_state_dict, {k: v for k, v in state.items() if k != "visual.conv1.weight"}, None, **HEADS)
    extra = {**state, "visual.attn_pool.query": np.zeros((4, 32), np.float32), "logit_bias": np.zeros(())}
    one_line_error(r"unknown tensor 'logit_bias' \(and 1 more\)", oc.convert_state_dict, extra, None, **HEADS)
    layer_scale = {**state, "transformer.resblocks.0.ls_1.gamma": np.zeros(12, np.float32)}
    one_line_error(r"unknown tensor 'transformer\.resblocks\.0\.ls_1\.gamma'",
                   oc.convert_state_dict, layer_scale, None, **HEADS)
    bad_shape = {**state, "transformer.resblocks.0.mlp.c_proj.weight": np.zeros((12, 47), np.float16)}
    one_line_error(r"'transformer\.resblocks\.0\.mlp\.c_proj\.weight' has shape \(12, 47\), .* needs \(12, 48\)",
                   oc.convert_state_dict, bad_shape, None, **HEADS)
    one_line_error("give model_name or both vision_heads and text_heads", oc.convert_state_dict, state, None)
    one_line_error(r"^open_clip state dict: CLIP vision encoder: hidden_size 32 is not a multiple of "
                   r"num_attention_heads 5$", oc.convert_state_dict, state, None, vision_heads=5, text_heads=3)
    one_line_error(r"not a ViT-H-14 checkpoint: widths vision 32, text 12", oc.convert_state_dict, state)
    one_line_error("unknown OpenCLIP model 'ViT-Q-99'", oc.convert_state_dict, state, "ViT-Q-99")

    # File-level problems name the file.
    one_line_error("nowhere.pt does not exist", oc.load_open_clip, tmp_path / "nowhere.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    one_line_error(r"cannot read .*corrupt\.pt safely", oc.load_open_clip, tmp_path / "corrupt.pt")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 16)
    one_line_error(r"corrupt safetensors file .*corrupt\.safetensors", oc.load_open_clip,
                   tmp_path / "corrupt.safetensors")
    torch.save({"state_dict": {}}, tmp_path / "empty.pt")
    one_line_error(r"empty\.pt: not an OpenCLIP checkpoint", oc.load_open_clip, tmp_path / "empty.pt")
    torch.save({"module.logit_scale": torch.zeros(()), "ln_final.weight": torch.ones(3)}, tmp_path / "mixed.pt")
    one_line_error(r"mixed\.pt: some tensors carry the 'module\.' prefix and some not \(e\.g\. 'ln_final\.weight'\)",
                   oc.load_open_clip, tmp_path / "mixed.pt")
    torch.save({"state_dict": {**{k: torch.from_numpy(v) for k, v in state.items()}, "visual.head.weight":
                               torch.zeros(2)}}, tmp_path / "extra.pt")
    one_line_error(r"extra\.pt: unknown tensor 'visual\.head\.weight'", oc.load_open_clip, tmp_path / "extra.pt",
                   None, **HEADS)


def test_vit_h_14_architecture(ref):
    """The real HPS architecture, from open_clip's ViT-H-14 tensor shapes (no weights anywhere)."""
    shapes = json.loads(str(ref["vit_h_14_shapes"]))
    state = {key: SimpleNamespace(shape=tuple(shape)) for key, shape in shapes.items()}
    config = oc.infer_config(state, "ViT-H-14")
    assert oc.expected_shapes(config) == {key: tuple(shape) for key, shape in shapes.items()}
    v, t = config.vision, config.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size,
            v.intermediate_size) == (1280, 32, 16, 14, 224, 5120)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings, t.vocab_size,
            t.intermediate_size, t.eos_token_id) == (1024, 24, 16, 77, 49408, 4096, 2)
    assert v.hidden_act == t.hidden_act == "gelu" and config.projection_dim == 1024
    abstract = cv.abstract_params(cv.CLIPModel(config))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract))
    assert count == int(ref["vit_h_14_params"]) == 986_109_441  # open_clip.create_model("ViT-H-14")'s


# -------------------------------------------------------------------------------------- captions

def test_token_ids_match_open_clip(ref, monkeypatch):
    captions = json.loads(str(ref["captions"]))
    assert np.array_equal(hps.tokenize(captions), ref["input_ids"])
    monkeypatch.setitem(sys.modules, "ftfy", None)  # the built-in cleaning, whether or not ftfy is installed
    assert np.array_equal(hps.tokenize(captions), ref["input_ids"])
    long = ref["input_ids"][7]
    assert long[-1] == hps.EOT and 0 not in long  # truncated, EOT kept last
    assert np.count_nonzero(hps.tokenize(captions[7], 200)) > 77
    assert hps.tokenize("a cat").shape == (1, 77) and hps.tokenize([]).shape == (0, 77)


# ---------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("i", range(5))
def test_preprocessing_matches_hpsv2(ref, i):
    src, expected = ref[f"pre_src_{i}"], ref[f"pre_out_{i}"]
    size = expected.shape[0]
    ours = hps.preprocess(src, size)[0]
    # Same float32 formula, evaluated by torch and numpy/XLA: equal to rounding (~1e-6 of the range).
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    jax_path = hps.preprocess_jax(jnp.asarray(src[None] / np.float32(255.0)), size)[0]
    np.testing.assert_allclose(jax_path, expected, rtol=0, atol=1e-5)


def test_score_pixels_match_hpsv2(ref):
    np.testing.assert_allclose(hps.preprocess(score_sources(ref), 32), ref["score_pixel_values"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ ReFL

def test_reward_is_differentiable_and_equals_the_metric(ref, hps_model):
    model, params = hps_model
    reward = hps.HPSReward(model)
    images = np.stack([ref["score_src_0"][:, :70], np.flipud(ref["score_src_0"])])  # [2, 45, 70, 3]
    ids = jnp.asarray(ref["input_ids"][:2])
    images01 = jnp.asarray(images / np.float32(255.0))

    metric_pixels = jnp.asarray(hps.preprocess(list(images), 32))  # the metric path, from the uint8 images

    @jax.jit
    def run(params, images01, ids, metric_pixels):
        total = lambda x: jnp.sum(reward(params, x, {"input_ids": ids}))
        value, grad = jax.value_and_grad(total)(images01)
        cached_text = reward(params, images01, {"text_embeds": reward.text_embeds(params, ids)})
        return value, grad, cached_text, hps.hps_score(model, params, metric_pixels, ids)

    value, grad, per_image, metric = run(params, images01, ids, metric_pixels)
    assert rel_l2(per_image, metric) <= 1e-5
    assert abs(float(value) - float(jnp.sum(metric))) <= 1e-5
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    with pytest.raises(SafeJaxError, match="needs batch"):
        reward(params, images01, {})
