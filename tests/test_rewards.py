"""Reward models: our Flax CLIPModel against transformers', the JAX preprocessing against PyTorch and
PIL, and the reward functions' values and gradients."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import rel_l2
from PIL import Image

from safe_jax.errors import SafeJaxError
from safe_jax.io import clip_folder
from safe_jax.io.convert import flax_to_torch, torch_to_flax
from safe_jax.models import clip_vision as cv
from safe_jax.text.tokenizer import tokenize
from safe_jax.train.rewards import (
    CLIP_MEAN,
    CLIP_STD,
    available_rewards,
    clip_tokenizer,
    load_clip_reward,
    make_reward,
    preprocess,
    resize_bicubic,
)

CAPTIONS = ["a photo of a cat", "Firefighters at a flooded street in Leeds.", "Boris Johnson on Tower Bridge"]
TINY = cv.PRESETS["tiny"]
# The other text pooling path (legacy eos_token_id=2: argmax), gelu, and an image size the patch
# size does not divide (the conv drops the remainder, as transformers' does).
TINY_LEGACY = dataclasses.replace(
    TINY,
    text=dataclasses.replace(TINY.text, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    vision=dataclasses.replace(TINY.vision, hidden_act="gelu", image_size=30),
    logit_scale_init_value=3.1,
)


def torch_clip(cfg: cv.CLIPConfig, seed: int = 0) -> transformers.CLIPModel:
    """transformers' CLIPModel, random weights, every tensor perturbed so norms are not identity."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel._from_config(transformers.CLIPConfig(**cfg.to_hf()), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return tokenize(clip_tokenizer(), CAPTIONS)


@pytest.fixture(scope="module")
def tiny_pair():
    """(torch model, our module, our params) for the tiny preset."""
    pt = torch_clip(TINY)
    model = cv.CLIPModel(TINY)
    return pt, model, cv.from_hf_state_dict(numpy_state_dict(pt), model)


@functools.partial(jax.jit, static_argnums=0)
def clip_forward(model, params, pixels, ids):
    """Both towers, the image features alone and the vision tower's outputs, in one compile."""
    def parts(m, x):
        vision = m.vision_model(x)
        return m.visual_projection(vision["pooler_output"]), vision

    return (model.apply({"params": params}, pixels, ids), *model.apply({"params": params}, pixels, method=parts))


def images01(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w, 3), dtype=np.float32)


# ------------------------------------------------------------------------------------- CLIP model

@pytest.mark.parametrize("cfg", [TINY, TINY_LEGACY], ids=["quick_gelu_eos", "gelu_legacy_eos_size30"])
def test_clip_parity_with_transformers(cfg, ids):
    pt = torch_clip(cfg)
    model = cv.CLIPModel(cfg)
    params = cv.from_hf_state_dict(numpy_state_dict(pt), model)
    s = cfg.vision.image_size
    pixels = np.random.default_rng(1).standard_normal((2, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        expected = pt(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels))
        vision = pt.vision_model(pixel_values=nchw(pixels))
        image_features = pt.get_image_features(pixel_values=nchw(pixels)).pooler_output
    out, feats, inner = clip_forward(model, params, pixels, ids)
    assert out["logits_per_image"].shape == (2, 3)
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert rel_l2(out[key], getattr(expected, key)) <= 1e-5, key
    assert rel_l2(feats, image_features) <= 1e-5
    assert len(inner["hidden_states"]) == cfg.vision.num_hidden_layers + 1
    assert rel_l2(inner["last_hidden_state"], vision.last_hidden_state) <= 1e-5
    assert rel_l2(inner["pooler_output"], vision.pooler_output) <= 1e-5
    with pytest.raises(SafeJaxError, match=rf"\[B, {s}, {s}, 3\]"):
        jax.eval_shape(lambda p: model.apply({"params": p}, pixels[:, :-1], ids), params)


def test_state_dict_round_trip_is_bitwise(tiny_pair):
    pt, model, _ = tiny_pair
    sd = numpy_state_dict(pt)
    assert not any("position_ids" in k for k in sd)  # non-persistent buffers in transformers 5
    assert {"logit_scale", "visual_projection.weight", "text_projection.weight",
            "vision_model.pre_layrnorm.weight", "vision_model.embeddings.class_embedding"} <= set(sd)
    back = flax_to_torch(torch_to_flax(sd, cv.abstract_params(model)))
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), key
    legacy = {**sd, "text_model.embeddings.position_ids": np.arange(77)[None],
              "vision_model.embeddings.position_ids": np.arange(TINY.vision.num_patches + 1)[None]}
    assert set(cv.to_hf_state_dict(cv.from_hf_state_dict(legacy, model))) == set(sd)
    remat = cv.abstract_params(cv.CLIPModel(TINY, remat_policy="full"))  # same names, same checkpoint keys
    assert jax.tree_util.tree_structure(remat) == jax.tree_util.tree_structure(cv.abstract_params(model))
    with pytest.raises(SafeJaxError, match="1 unexpected"):
        cv.from_hf_state_dict({**sd, "vision_model.extra.weight": np.zeros(1)}, model)


def test_load_and_save_folders(tmp_path, tiny_pair, ids):
    pt, _, _ = tiny_pair
    pixels = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = pt(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels)).logits_per_image.numpy()

    saved = tmp_path / "hf"
    pt.save_pretrained(saved)
    assert (saved / "model.safetensors").is_file()
    model, params = clip_folder.load_clip(saved)
    assert model.config == TINY
    logits = clip_forward(model, params, pixels, ids)[0]["logits_per_image"]  # compiled once for both tests
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    # pytorch_model.bin, read with torch.load(weights_only=True)
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    (as_bin / "config.json").write_bytes((saved / "config.json").read_bytes())
    torch.save(pt.state_dict(), as_bin / "pytorch_model.bin")
    _, bin_params = clip_folder.load_clip(as_bin)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, bin_params, params))

    # Our export loads in transformers with nothing missing and gives the same scores.
    ours = clip_folder.save_clip(model, params, tmp_path / "ours")
    back, info = transformers.CLIPModel.from_pretrained(str(ours), attn_implementation="eager",
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        again = back.eval()(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels)).logits_per_image
    np.testing.assert_array_equal(again.numpy(), expected)

    with pytest.raises(SafeJaxError, match="does not exist"):
        clip_folder.load_clip(tmp_path / "nowhere")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((saved / "config.json").read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SafeJaxError, match="corrupt safetensors"):
        clip_folder.load_clip(corrupt)
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(SafeJaxError, match="no weights"):
        clip_folder.load_clip(corrupt)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(SafeJaxError, match="invalid JSON"):
        clip_folder.load_clip(corrupt)
    (corrupt / "config.json").unlink()
    with pytest.raises(SafeJaxError, match="missing file"):
        clip_folder.load_clip(corrupt)
    (corrupt / "config.json").write_text('{"model_type": "clip_text_model", "hidden_size": 32}')
    with pytest.raises(SafeJaxError, match="not a CLIPModel"):
        clip_folder.load_clip(corrupt)
    wrong = dataclasses.replace(TINY, projection_dim=8)  # the weights are for 16
    (corrupt / "config.json").write_text(json.dumps(wrong.to_hf()))
    (corrupt / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    with pytest.raises(SafeJaxError, match="projection.weight' has shape .16, 32. in the checkpoint but the config needs .8, 32."):
        clip_folder.load_clip(corrupt)


def test_config_from_hf():
    hf = {**cv.PRESETS["clip-vit-large-patch14"].to_hf(), "_name_or_path": "openai/clip-vit-large-patch14"}
    cfg = cv.CLIPConfig.from_hf(hf)
    assert cfg == cv.PRESETS["clip-vit-large-patch14"] and cfg.to_hf() == hf
    # Old hub configs: text_config_dict (completed with defaults) overrides text_config, as in
    # transformers; absent sub-configs are transformers' defaults.
    old = {"model_type": "clip", "projection_dim": 768, "text_config": {"hidden_size": 999, "num_hidden_layers": 3},
           "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12}}
    cfg = cv.CLIPConfig.from_hf(old)
    theirs = transformers.CLIPConfig(**old)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(cfg.text, field) == getattr(theirs.text_config, field), field
    for field in ("hidden_size", "num_hidden_layers", "patch_size", "image_size"):
        assert getattr(cfg.vision, field) == getattr(theirs.vision_config, field), field
    assert cv.CLIPConfig.from_hf({**hf, "vision_config": {**hf["vision_config"], "image_size": [224, 224]}}) == cfg.__class__.from_hf(hf)
    with pytest.raises(SafeJaxError, match="image_size"):
        cv.CLIPConfig.from_hf({**hf, "vision_config": {**hf["vision_config"], "image_size": [224, 192]}})
    with pytest.raises(SafeJaxError, match="hidden_act 'relu'"):
        cv.CLIPConfig.from_hf({**hf, "vision_config": {**hf["vision_config"], "hidden_act": "relu"}})


@pytest.mark.parametrize("name, known", [("clip-vit-base-patch32", 151_277_313),
                                         ("clip-vit-large-patch14", 427_616_513),
                                         ("clip-vit-h-14", 986_109_441)])
def test_full_size_parameter_counts(name, known):
    cfg = cv.PRESETS[name]
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(cv.abstract_params(cv.CLIPModel(cfg))))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.CLIPModel(transformers.CLIPConfig(**cfg.to_hf())).parameters())
    assert ours == theirs == known


# ---------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("shape", [(300, 260, 258, 224), (40, 48, 224, 268), (37, 53, 17, 91)])
def test_resize_matches_pil_and_torch(shape):
    h, w, oh, ow = shape
    x = images01(2, h, w, seed=h)
    ours = np.asarray(resize_bicubic(jnp.asarray(x), oh, ow))
    # PIL BICUBIC on float ("F") images: the same filter, computed in double as we do.
    pil = np.stack([np.asarray(Image.fromarray(x[0, :, :, c], mode="F").resize((ow, oh), Image.BICUBIC))
                    for c in range(3)], -1)
    assert np.abs(ours[0] - pil).max() <= 1e-6
    # PyTorch computes source coordinates in float32, hence the looser bound.
    for antialias in (True, False):
        ours = np.asarray(resize_bicubic(jnp.asarray(x), oh, ow, antialias=antialias))
        ref = F.interpolate(nchw(x), size=(oh, ow), mode="bicubic", align_corners=False, antialias=antialias)
        assert np.abs(ours - ref.numpy().transpose(0, 2, 3, 1)).max() <= 1e-4


def test_preprocess_matches_torchvision_recipe_and_passes_gradients():
    x = images01(2, 96, 80, seed=3)
    out = jax.jit(preprocess)(jnp.asarray(x))
    assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
    # torchvision Resize(224, BICUBIC) + CenterCrop(224) + Normalize on tensors, spelled out:
    # shorter side 80 -> 224, longer int(224 * 96 / 80) = 268, crop top round(44 / 2) = 22.
    ref = F.interpolate(nchw(x), size=(268, 224), mode="bicubic", align_corners=False, antialias=True)
    ref = ref[:, :, 22:22 + 224, :]
    ref = (ref - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert np.abs(np.asarray(out) - ref.numpy().transpose(0, 2, 3, 1)).max() <= 1e-3  # 1e-4 in [0,1] units
    grad = jax.grad(lambda im: jnp.sum(preprocess(im) ** 2))(jnp.asarray(x))
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    # Rows ≈ 6..90 of 96 reach the crop window (rows 22..245 of the 268-row resize); the rest do not.
    assert float(jnp.abs(grad[:, 10:86]).min()) > 0 and float(jnp.abs(grad[:, :4]).max()) == 0
    with pytest.raises(SafeJaxError, match=r"\[B, H, W, 3\]"):
        preprocess(jnp.zeros((2, 3, 64, 64)))


# ---------------------------------------------------------------------------------------- rewards

def _ascend(reward, params, images, batch, steps=5, lr=0.5):
    step = jax.jit(lambda x: x + lr * jax.grad(lambda y: jnp.sum(reward(params, y, batch)))(x))
    values = [reward(params, images, batch)]
    for _ in range(steps):
        images = step(images)
        values.append(reward(params, images, batch))
    return images, values


def test_pixel_rewards_gradient_ascent():
    x = jnp.asarray(images01(2, 8, 8, seed=4)) * 0.5
    bright = make_reward("brightness")
    assert bright.init_params() == {}
    np.testing.assert_allclose(bright({}, x), np.asarray(x).mean(axis=(1, 2, 3)), rtol=1e-6)
    grad = jax.grad(lambda y: jnp.sum(bright({}, y)))(x)
    assert bool(jnp.all(grad > 0))
    _, values = _ascend(bright, {}, x, None)
    assert all(bool(jnp.all(b > a)) for a, b in zip(values, values[1:]))

    red = make_reward("target_colour", target=(1.0, 0.0, 0.0))
    assert make_reward("target_color", target=[1, 0, 0]) == red
    np.testing.assert_allclose(red({}, x), -np.linalg.norm(np.asarray(x).mean(axis=(1, 2)) - [1, 0, 0], axis=-1),
                               rtol=1e-6)
    grad = jax.grad(lambda y: jnp.sum(red({}, y)))(x)
    assert bool(jnp.all(grad[..., 0] > 0)) and bool(jnp.all(grad[..., 1:] < 0))
    _, values = _ascend(red, {}, x, None, steps=10, lr=3.2)  # the mean moves 0.05 a step, towards red
    assert all(bool(jnp.all(b >= a)) for a, b in zip(values, values[1:]))
    assert float(values[-1].min()) > float(values[0].max())
    at_target = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0]), (1, 4, 4, 3))
    assert float(red({}, at_target)[0]) == 0.0
    assert bool(jnp.all(jax.grad(lambda y: jnp.sum(red({}, y)))(at_target) == 0))  # not NaN


def clip_reward_outputs(tiny_pair, ids):
    """Every CLIP reward quantity the test below checks, from one compiled function (compiling
    is most of the cost on a CPU), for the tiny CLIP with transformers' (perturbed) weights."""
    pt, model, params = tiny_pair
    x = images01(3, 48, 40, seed=5)  # not the model's 32x32: preprocessing resizes and crops
    gt = images01(3, 64, 56, seed=6)
    pick = make_reward("pickscore", clip=model)
    clipscore = make_reward("clipscore", clip=model)
    cosine = make_reward("clip_score", clip=model, score="cosine")
    dfe0 = make_reward("dfe", clip=model, alpha=0.0, score="cosine")
    dfe = make_reward("dfe", clip=model, alpha=0.5, score="cosine")

    @jax.jit
    def run(p, y, g, t):
        # Frozen (precomputed) text and ground-truth embeddings wherever the raw-input path is not
        # what is under test: fewer model passes to compile.
        ids_gt = {"input_ids": t, "gt_images": g}
        text, gt_embeds = pick.text_embeds(p, t), dfe.image_embeds(p, g)
        frozen = {"text_embeds": text, "gt_image_embeds": gt_embeds}
        dfe_sum = lambda z: jnp.sum(dfe(p, z, frozen))
        value, grad = jax.value_and_grad(dfe_sum)(y)
        grad_gt = jax.grad(lambda h: jnp.sum(dfe(p, y, {"text_embeds": text, "gt_images": h})))(g)
        return dict(pickscore=pick(p, y, ids_gt), clipscore=clipscore(p, y, frozen), cosine=cosine(p, y, frozen),
                    pickscore_frozen=pick(p, y, frozen), dfe0=dfe0(p, y, frozen), dfe=dfe(p, y, ids_gt),
                    dfe_frozen=dfe(p, y, frozen), same=dfe.image_similarity(p, y, y),
                    sim_gt=jnp.sum(dfe.image_embeds(p, y) * gt_embeds, -1), grad=grad, grad_gt=grad_gt,
                    dfe_sum=value, dfe_sum_after=dfe_sum(y + 2.0 * grad))

    out = run(params, x, gt, ids)
    pixels = np.asarray(preprocess(jnp.asarray(x), TINY.vision.image_size))
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels))
    out["hf_pickscore"] = np.diag(ref.logits_per_image.numpy())
    out["hf_cos"] = np.sum(ref.image_embeds.numpy() * ref.text_embeds.numpy(), -1)
    out["x"], out["params"], out["rewards"] = x, params, (pick, dfe, dfe0)
    return out


def test_clip_rewards(tiny_pair, ids):
    """clip_score (pickscore / clipscore / cosine) against transformers, and the DFE reward."""
    out = clip_reward_outputs(tiny_pair, ids)
    assert out["pickscore"].shape == (3,) and out["pickscore"].dtype == jnp.float32
    assert rel_l2(out["pickscore"], out["hf_pickscore"]) <= 1e-5  # exp(logit_scale)·cos = logits_per_image
    np.testing.assert_allclose(out["clipscore"], 2.5 * np.maximum(out["hf_cos"], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["cosine"], out["hf_cos"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["pickscore_frozen"], out["pickscore"], rtol=1e-5)  # precomputed text
    pick = out["rewards"][0]
    with pytest.raises(SafeJaxError, match="needs batch\\['text_embeds' or 'input_ids'\\]"):
        jax.eval_shape(lambda p: pick(p, out["x"], {}), out["params"])

    # DFE (our design): caption score + alpha * cos(f(x), f(x_gt)); here with the cosine caption score.
    _, dfe, dfe0 = out["rewards"]
    np.testing.assert_array_equal(out["dfe0"], out["cosine"])  # alpha = 0: the caption score
    np.testing.assert_allclose(out["same"], np.ones(3), atol=1e-6)  # an image and itself
    expected = out["cosine"] + 0.5 * out["sim_gt"]
    np.testing.assert_allclose(out["dfe"], expected, rtol=1e-5)
    np.testing.assert_allclose(out["dfe_frozen"], expected, rtol=1e-5)
    grad = out["grad"]
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
    assert float(out["dfe_sum_after"]) > float(out["dfe_sum"])  # one ascent step raises the reward
    assert float(jnp.abs(out["grad_gt"]).max()) == 0.0  # the ground truth is a fixed target
    x, params = out["x"], out["params"]
    with pytest.raises(SafeJaxError, match="gt_images"):
        jax.eval_shape(lambda p: dfe(p, x, {"input_ids": ids}), params)
    assert jax.eval_shape(lambda p: dfe0(p, x, {"input_ids": ids}), params).shape == (3,)  # no gt needed


def test_registry_and_errors(tmp_path):
    assert {"brightness", "target_colour", "clip_score", "pickscore", "clipscore", "dfe"} <= set(available_rewards())
    with pytest.raises(SafeJaxError, match="unknown reward 'nope'"):
        make_reward("nope")
    with pytest.raises(SafeJaxError, match="reward 'brightness'"):
        make_reward("brightness", alpha=1.0)
    with pytest.raises(SafeJaxError, match="three numbers"):
        make_reward("target_colour", target=(1.0, 0.0))
    with pytest.raises(SafeJaxError, match="unknown score 'hps'"):
        make_reward("clip_score", score="hps")
    with pytest.raises(SafeJaxError, match="unknown CLIP preset"):
        make_reward("pickscore", clip="clip-xxl")
    with pytest.raises(SafeJaxError, match=r"\[B, H, W, 3\]"):
        make_reward("brightness")({}, jnp.zeros((2, 8, 8)))
    with pytest.raises(SafeJaxError, match="does not exist"):
        load_clip_reward(tmp_path / "nowhere")
    with pytest.raises(SafeJaxError, match="is a folder: use load_clip_reward"):
        make_reward("pickscore", clip=str(tmp_path))
    with pytest.raises(SafeJaxError, match="not a CLIP reward"):
        load_clip_reward(tmp_path, "brightness")
    # init_params: host-drawn random CLIP weights with exactly the loadable tree.
    reward = make_reward("pickscore")
    params = reward.init_params(seed=0)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(cv.abstract_params(reward.model))
    assert float(params["logit_scale"]) == pytest.approx(TINY.logit_scale_init_value)
    assert set(cv.to_hf_state_dict(params)) == set(numpy_state_dict(torch_clip(TINY)))
    # Rewards are hashable values: usable as static jit arguments and dict keys.
    assert hash(make_reward("dfe", alpha=0.5)) == hash(make_reward("dfe", alpha=0.5))


def test_load_clip_reward(tmp_path, tiny_pair, ids):
    pt, _, params = tiny_pair
    pt.save_pretrained(tmp_path)
    reward, loaded = load_clip_reward(tmp_path, "dfe", alpha=0.25, score="clipscore")
    assert reward.name == "dfe" and reward.alpha == 0.25 and reward.score == "clipscore"
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, loaded, params))
    x = jnp.asarray(images01(2, 32, 32, seed=8))
    value = jax.eval_shape(lambda p: reward(p, x, {"input_ids": ids[:2], "gt_images": x}), loaded)
    assert value.shape == (2,) and value.dtype == jnp.float32
