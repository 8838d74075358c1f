"""ImageReward in Flax against the ``image-reward`` package's own outputs.

The fixtures in tests/fixtures/reference/imagereward/ were written by the package's code at a toy
size (tests/reference/fixtures_imagereward.py, reference environment only): its checkpoint,
med_config.json, tokenizer folder, and what its ``score``, ``inference_rank``, ``score_gard``,
tokenizer call and image transform returned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest
from conftest import rel_l2

from safe_jax.errors import SafeJaxError
from safe_jax.io import image_reward as ir
from safe_jax.models import blip

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "imagereward"
CHECKPOINT = FIXTURES / "ImageReward.pt"
TINY = blip.VISION_PRESETS["tiny"]
TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "outputs.npz"))


@pytest.fixture(scope="module")
def loaded():
    return ir.load_image_reward(CHECKPOINT, vision="tiny")


def _apply(model, params, *args, method=None):
    return np.asarray(model.apply({"params": params}, *(jnp.asarray(a) for a in args), method=method))


def test_loads_the_fixture_architecture(loaded):
    model, params, tokenizer = loaded
    assert model.config == blip.PRESETS["tiny"]
    assert len(tokenizer) == model.config.text.vocab_size  # bert vocab + BLIP's [DEC] and [ENC]


def test_features_and_reward_match_reference(loaded, ref):
    model, params, _ = loaded
    embeds = _apply(model, params, ref["pixel_values"], method="image_embeds")
    assert rel_l2(embeds, ref["image_embeds"]) <= TOL
    # The text encoder on the reference's own image tokens, so each stage is compared on its own.
    features = _apply(model, params, ref["input_ids"], ref["attention_mask"], ref["image_embeds"],
                      method="text_features")
    assert rel_l2(features, ref["text_features"]) <= TOL
    reward = _apply(model, params, ref["pixel_values"], ref["input_ids"], ref["attention_mask"])
    assert reward.shape == (3,) and reward.dtype == np.float32
    for key in ("rewards", "score_gard"):
        assert rel_l2(reward, ref[key]) <= TOL, key
    # Before the constant shift, so that the shift cannot hide an error in the head.
    assert rel_l2(reward * blip.REWARD_STD + blip.REWARD_MEAN, ref["mlp_out"]) <= TOL


def test_metric_matches_score_and_inference_rank(loaded, ref):
    """uint8 images -> PIL preprocessing -> tokenizer -> model, against ``score(prompt, file)``
    per image and ``inference_rank(prompt, files)``."""
    model, params, tokenizer = loaded
    images = [ref[f"model_src_{i}"] for i in range(3)]
    prompts = json.loads(str(ref["model_prompts"]))
    assert rel_l2(ir.score(model, params, tokenizer, images, prompts), ref["score"]) <= TOL
    assert rel_l2(ir.score(model, params, tokenizer, images, prompts[0]), ref["rank_rewards"]) <= TOL


def test_tokenize_matches_reference(loaded, ref):
    _, _, tokenizer = loaded
    input_ids, attention_mask = ir.tokenize(tokenizer, json.loads(str(ref["token_prompts"])))
    assert input_ids.dtype == np.int32 and input_ids.shape == (9, blip.MAX_LENGTH)
    np.testing.assert_array_equal(input_ids, ref["token_input_ids"])
    np.testing.assert_array_equal(attention_mask, ref["token_attention_mask"])
    assert (input_ids[:, 0] == tokenizer.cls_token_id).all()  # ImageReward keeps [CLS]; no [ENC] swap
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [int(ref["bos_token_id"]), int(ref["enc_token_id"])]


@pytest.mark.parametrize("case", range(7))
def test_preprocess_matches_reference(ref, case):
    src, expected = ref[f"pre_src_{case}"], ref[f"pre_out_{case}"]
    ours = ir.preprocess_images([src], expected.shape[0])[0]
    # One uint8 level is 1/255/std ≈ 0.015 after normalisation.
    levels = np.abs(ours - expected).max() * 255 * min(ir.CLIP_STD)
    if levels > 1.01 and PIL.__version__ != str(ref["pillow_version"]):
        pytest.skip(f"fixture written with Pillow {ref['pillow_version']}, this is {PIL.__version__}: the "
                    f"order of PIL's two bicubic passes (with uint8 rounding between) differs for this size")
    assert levels <= 1.01, f"{levels:.2f} uint8 levels off"


def test_differentiable_reward_matches_metric_and_has_gradients(loaded, ref):
    model, params, tokenizer = loaded
    prompts = json.loads(str(ref["model_prompts"]))
    input_ids, attention_mask = ir.tokenize(tokenizer, prompts[:1])
    reward = jax.jit(lambda x: ir.imagereward_reward(model, params, x, input_ids, attention_mask))
    for i in (1, 2):  # 1 needs no resize, 2 is upsampled (PIL rounds to uint8 there, JAX does not)
        src = ref[f"model_src_{i}"]
        metric = ir.score(model, params, tokenizer, [src], prompts[:1])
        ours = np.asarray(reward(jnp.asarray(src[None], jnp.float32) / 255.0))
        np.testing.assert_allclose(ours, metric, atol=1e-5 if i == 1 else 5e-3)
    images01 = jnp.asarray(ref["model_src_2"][None], jnp.float32) / 255.0
    grad = jax.jit(jax.grad(lambda x: ir.imagereward_reward(model, params, x, input_ids, attention_mask).sum()))
    g = np.asarray(grad(images01))
    assert g.shape == images01.shape and np.isfinite(g).all() and np.abs(g).max() > 0


def test_state_dict_round_trip_is_bitwise(loaded):
    import torch

    _, params, _ = loaded
    state = {k: v.numpy() for k, v in torch.load(CHECKPOINT, map_location="cpu", weights_only=True).items()}
    ours = blip.to_state_dict(params)
    dropped = {blip.POSITION_IDS, *blip.UNUSED_HEADS}
    assert set(ours) == set(state) - dropped and dropped <= set(state)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_safetensors_checkpoint(loaded, tmp_path):
    from safetensors.numpy import save_file

    _, params, _ = loaded
    shutil.copytree(FIXTURES / "tokenizer", tmp_path / "bert-base-uncased")  # the other folder name
    shutil.copy(FIXTURES / "med_config.json", tmp_path)
    save_file(ir.read_state_dict(CHECKPOINT), str(tmp_path / "ImageReward.safetensors"))
    _, again, _ = ir.load_image_reward(tmp_path / "ImageReward.safetensors", vision=TINY)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def _save_variant(tmp_path: Path, change) -> Path:
    import torch

    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "ImageReward.pt")
    for name in ("med_config.json", "tokenizer"):
        if not (tmp_path / name).exists():
            (shutil.copytree if name == "tokenizer" else shutil.copy)(FIXTURES / name, tmp_path / name)
    return tmp_path / "ImageReward.pt"


def _one_line_error(*args, **kwargs) -> str:
    with pytest.raises(SafeJaxError) as info:
        ir.load_image_reward(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    path = _save_variant(tmp_path, lambda s: s.pop(key))
    message = _one_line_error(path, vision=TINY)
    assert "1 missing" in message and key in message and str(path) in message
    extra = "blip.visual_encoder.blocks.1.attn.extra.weight"
    path = _save_variant(tmp_path, lambda s: s.update({extra: s["blip.visual_encoder.norm.weight"]}))
    message = _one_line_error(path, vision=TINY)
    assert "1 unexpected" in message and extra in message


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
    import torch

    message = _one_line_error(CHECKPOINT)  # the released ViT-L/16 does not fit the toy checkpoint
    assert str(CHECKPOINT) in message and "vision=" in message and "width 48" in message
    assert str(tmp_path / "none.pt") in _one_line_error(tmp_path / "none.pt", vision=TINY)
    assert "not a regular file" in _one_line_error(tmp_path, vision=TINY)

    path = _save_variant(tmp_path, lambda s: s[blip.POSITION_IDS].add_(1))
    assert blip.POSITION_IDS in _one_line_error(path, vision=TINY)

    path = _save_variant(tmp_path, lambda s: None)
    (tmp_path / "med_config.json").write_text("{ not json")
    assert "med_config.json" in _one_line_error(path, vision=TINY)
    (tmp_path / "med_config.json").write_text(json.dumps(
        dict(json.loads((FIXTURES / "med_config.json").read_text()), add_cross_attention=False)))
    assert "add_cross_attention" in _one_line_error(path, vision=TINY)
    shutil.copy(FIXTURES / "med_config.json", tmp_path)

    shutil.rmtree(tmp_path / "tokenizer")
    assert "tokenizer" in _one_line_error(path, vision=TINY)
    assert "vocab.txt" in _one_line_error(path, tokenizer=tmp_path, vision=TINY)
    shutil.copytree(FIXTURES / "tokenizer", tmp_path / "tokenizer")

    torch.save([1, 2], tmp_path / "list.pt")
    assert "state dict" in _one_line_error(tmp_path / "list.pt", vision=TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert str(tmp_path / "junk.pt") in _one_line_error(tmp_path / "junk.pt", vision=TINY)


def test_released_architecture_size():
    """ViT-L/16 + BERT-base with cross-attention + the MLP: the reference's ImageReward has
    446,665,953 parameters, of which the contrastive heads we drop hold 459,264."""
    assert blip.param_count(blip.ImageRewardModel(blip.preset("large"))) == 446_665_953 - 459_264
