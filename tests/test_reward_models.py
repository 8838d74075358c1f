"""HPS v2 and ImageReward as ReFL rewards: built from the registry and from a training config,
equal to their metrics, differentiable, trained with in a real step, fed their own tokens by the
input pipeline (worker processes too), and bad reward settings refused in one line.

The checkpoints are the reference fixtures' toy ones (tests/fixtures/reference): ImageReward with
the "tiny" vision preset, HPS with 4 vision and 3 text heads (an OpenCLIP arch registered as "toy"
where a config has to name it)."""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.eval import hps
from safe_jax.io import image_reward as ir
from safe_jax.io import open_clip as oc
from safe_jax.train import rewards

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
IMAGEREWARD = FIXTURES / "imagereward" / "ImageReward.pt"
HPS = FIXTURES / "open_clip" / "hps_tiny.pt"
HEADS = {"vision_heads": 4, "text_heads": 3}
CAPTIONS = ["Boris Johnson gives a thumbs up on Tower Bridge", "Firefighters pump water from a flooded street"]
# The same float32 formula on both sides, only evaluated by different code (see the test): rounding only.
TOL = 1e-5


@pytest.fixture(scope="module")
def imagereward():
    return ir.load_image_reward(IMAGEREWARD, vision="tiny")


@pytest.fixture(scope="module")
def hps_model():
    return hps.load_hps(HPS, None, **HEADS)


@pytest.fixture
def toy_arch(monkeypatch):
    """hps_tiny.pt's heads under an OpenCLIP name, so that a config can name them."""
    monkeypatch.setitem(oc.OPEN_CLIP_ARCHS, "toy", oc.OpenCLIPArch(32, 8, 12, 3))
    return "toy"


@pytest.fixture(scope="module")
def images_u8():
    """Two 64² images (the tiny model's training size), uint8 so that the metric sees the same pixels."""
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (2, 8, 8, 3)).repeat(8, 1).repeat(8, 2)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def config_for(name: str, checkpoint: Path | str, arch: str):
    from launch.configs import tiny_safe

    config = tiny_safe.get_config()
    config.reward.name, config.reward.checkpoint, config.reward.arch = name, str(checkpoint), arch
    return config


def reward_and_grad(reward, params, images01, batch):
    @jax.jit
    def run(params, images01, batch):
        value = reward(params, images01, batch)
        return value, jax.grad(lambda x: jnp.sum(reward(params, x, batch)))(images01)
    value, grad = run(params, images01, batch)
    return np.asarray(value), np.asarray(grad)


# ---------------------------------------------------------------------------------- (a) + (b)

def test_imagereward_reward_equals_the_metric_and_has_gradients(imagereward, images_u8):
    """64² images at the tiny ViT's size: neither path resizes, so PIL's uint8 resize (the metric)
    and the JAX resize (the reward) never differ; what is left is float32 rounding of the same
    normalisation and network, hence TOL."""
    model, params, tokenizer = imagereward
    reward = rewards.make_reward("imagereward", model=model)
    assert isinstance(reward, ir.ImageRewardReward) and hash(reward) == hash(rewards.make_reward("imagereward",
                                                                                                 model=model))
    text = ir.ImageRewardText(tokenizer)
    batch = {key: jnp.asarray(value) for key, value in rewards.text_batch(text, CAPTIONS).items()}
    ids, mask = ir.tokenize(tokenizer, CAPTIONS)
    np.testing.assert_array_equal(batch["reward_input_ids"], ids)
    np.testing.assert_array_equal(batch["reward_attention_mask"], mask)
    value, grad = reward_and_grad(reward, params, jnp.asarray(images_u8, jnp.float32) / 255.0, batch)
    metric = ir.score(model, params, tokenizer, images_u8, CAPTIONS)
    np.testing.assert_allclose(value, metric, rtol=0, atol=TOL)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    with pytest.raises(SafeJaxError, match=r"needs batch\['reward_input_ids'\] and batch\['reward_attention_mask'\]"):
        reward(params, jnp.asarray(images_u8, jnp.float32) / 255.0, {"input_ids": ids})
    # From a training config: the same reward (model and settings), weights and tokens, so the same values.
    loaded, loaded_params, loaded_text = _load_reward(config_for("imagereward", IMAGEREWARD, "tiny"))
    assert loaded == reward and isinstance(loaded_text, ir.ImageRewardText) and same_tree(loaded_params, params)
    np.testing.assert_array_equal(rewards.text_batch(loaded_text, CAPTIONS)["reward_input_ids"], ids)


def test_hps_reward_equals_the_metric_and_has_gradients(hps_model, images_u8, toy_arch):
    """64² images to the toy's 32²: the metric resizes the uint8 pixels as floats with PyTorch's
    antialiased bicubic (hpsv2's transform), the reward with the same filter in JAX, so the two
    differ by float32 rounding only (TOL)."""
    model, params = hps_model
    reward = rewards.make_reward("hps", model=model)
    assert isinstance(reward, hps.HPSReward)
    text = hps.HPSText(model.config.text.max_position_embeddings)
    batch = {key: jnp.asarray(value) for key, value in rewards.text_batch(text, CAPTIONS).items()}
    ids = hps.tokenize(CAPTIONS)
    np.testing.assert_array_equal(batch["reward_input_ids"], ids)
    value, grad = reward_and_grad(reward, params, jnp.asarray(images_u8, jnp.float32) / 255.0, batch)
    pixels = hps.preprocess(list(images_u8), model.config.vision.image_size)
    metric = np.asarray(jax.jit(hps.hps_score, static_argnums=0)(model, params, pixels, ids))
    np.testing.assert_allclose(value, metric, rtol=0, atol=TOL)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    loaded, loaded_params, loaded_text = _load_reward(config_for("hps", HPS, toy_arch))
    assert loaded == reward and loaded_text == text and same_tree(loaded_params, params)


def test_hps_reads_its_own_tokens_not_the_sd_ids(hps_model):
    """Measured: SD's ids (padded with EOS, or with "!" = 0 like open_clip's zeros for SD 2) give
    bit-identical HPS text features, because the causal tower is pooled at the first EOT; but
    captions that OpenCLIP's cleaning changes, and subject prefixes, give other features. Hence
    ``reward_input_ids`` from ``hps.tokenize``, which the reward prefers to ``input_ids``."""
    from safe_jax.text.conditioning import subject_token_weights
    from safe_jax.text.tokenizer import tiny_tokenizer

    model, params = hps_model
    reward = rewards.make_reward("hps", model=model)
    sd = tiny_tokenizer()
    clean, cleaned = CAPTIONS[0], "Fish &amp; chips in \u201cLondon\u201d"
    ours = hps.tokenize([clean, cleaned])
    eos_padded = subject_token_weights(sd, [clean, cleaned], [[], []]).ids
    assert eos_padded[0, -1] == hps.EOT
    zero_padded = np.where(np.cumsum(eos_padded == hps.EOT, axis=1) > 1, 0, eos_padded)
    prefixed = subject_token_weights(sd, [clean], [["Boris Johnson"]], fmt="prefix").ids
    rows = np.concatenate([ours, eos_padded, zero_padded, prefixed])
    features = np.asarray(jax.jit(reward.text_embeds)(params, jnp.asarray(rows)))
    ours, eos, zero, prefix = features[:2], features[2:4], features[4:6], features[6]
    for sd_features in (eos, zero):
        np.testing.assert_array_equal(sd_features[0], ours[0])
        assert np.abs(sd_features[1] - ours[1]).max() > 1e-3
    assert np.abs(prefix - ours[0]).max() > 1e-3
    # Given both, the reward reads reward_input_ids (one compile: the same batch structure each time).
    run = jax.jit(lambda ids, reward_ids: reward(params, jnp.full((1, 32, 32, 3), 0.5),
                                                 {"input_ids": ids, "reward_input_ids": reward_ids}))
    a, b = rows[:1], prefixed
    assert float(run(b, a)[0]) == float(run(a, a)[0]) != float(run(a, b)[0])


def same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _load_reward(config):
    from safe_jax.train.config_check import validate_config
    from safe_jax.train.loop import load_reward

    validate_config(config, check_devices=False)
    return load_reward(config)


# ------------------------------------------------------------------------------------------ (c)

@pytest.fixture(scope="module")
def tiny_sd():
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained("tiny")


@pytest.mark.parametrize("name", ["imagereward", "hps"])
def test_refl_step_trains_the_lora_with_the_reward(name, imagereward, hps_model, tiny_sd):
    from safe_jax import sharding
    from safe_jax.train import lora
    from safe_jax.train import step as ts

    if name == "imagereward":
        model, reward_params, tokenizer = imagereward
        reward, text = rewards.make_reward(name, model=model), ir.ImageRewardText(tokenizer)
    else:
        model, reward_params = hps_model
        reward, text = rewards.make_reward(name, model=model), hps.HPSText()
    pipe, params = tiny_sd
    cfg = ts.StepConfig(mode="lora", loss="refl", refl_steps=2, refl_step_range=(1, 1), refl_lambda=10.0,
                        ema_decay=None)
    tx = ts.make_optimizer(1e-3, total_steps=10, schedule="constant", weight_decay=0.0)
    state = ts.init_state(lora.init_lora(params["unet"], jax.random.key(0), rank=2), tx)
    frozen = {"text_encoder": params["text_encoder"], "vae": params["vae"], "unet": params["unet"],
              "reward": reward_params}
    tw = pipe.token_weights(CAPTIONS, [["Boris Johnson"], ["Firefighters"]])
    batch = {"input_ids": jnp.asarray(tw.ids), "token_weights": jnp.asarray(tw.weights),
             "images": jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1, maxval=1),
             **{key: jnp.asarray(value) for key, value in rewards.text_batch(text, CAPTIONS).items()}}
    model_fns = ts.DiffusionModel.from_modules(pipe.unet, pipe.vae, pipe.schedule)
    step = ts.compile_train_step(ts.make_train_step(model_fns, pipe.conditioner, cfg, tx, reward), state, frozen,
                                 batch, sharding.make_mesh())
    before = jax.tree.map(np.array, state.params)
    state, metrics = step(state, frozen, batch)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["reward"])) and float(metrics["refl_loss"]) > 0
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
    assert any(changed)


# ------------------------------------------------------------------------------------------ (d)

@pytest.mark.parametrize("workers", [0, 1])
def test_input_pipeline_adds_the_reward_tokens(imagereward, tmp_path_factory, workers):
    pytest.importorskip("grain")
    pytest.importorskip("tensorflow_datasets")
    from safe_jax.data import InputConfig, data_source, make_iterator
    from safe_jax.text.tokenizer import tiny_tokenizer

    data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    source = data_source("anchor/sample", "train", data_dir)
    text = ir.ImageRewardText(imagereward[2])
    assert pickle.loads(pickle.dumps(text))(CAPTIONS[0])["reward_input_ids"].tolist() == \
        text(CAPTIONS[0])["reward_input_ids"].tolist()
    config = InputConfig(data_dir=data_dir, resolution=16, batch_size=2, worker_count=workers, read_threads=1,
                         subject_format="prefix")
    iterator = make_iterator(config, tiny_tokenizer(), shard=(0, 1), source=source, reward_text=text)
    try:
        batch = next(iterator)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    by_id = {source[i]["image_id"]: source[i]["caption"].decode() for i in range(len(source))}
    captions = [by_id[bytes(image_id)] for image_id in batch["image_id"]]
    ids, mask = ir.tokenize(imagereward[2], captions)  # the plain captions: no subject prefix
    np.testing.assert_array_equal(batch["reward_input_ids"], ids)
    np.testing.assert_array_equal(batch["reward_attention_mask"], mask)
    assert batch["reward_input_ids"].dtype == np.int32 and batch["input_ids"].shape == (2, 77)


# ------------------------------------------------------------------------------------------ (e)

def one_line(config, match: str) -> str:
    from safe_jax.train.config_check import validate_config

    with pytest.raises(SafeJaxError, match=match) as info:
        validate_config(config, check_devices=False)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_bad_reward_settings_name_the_field(tmp_path):
    one_line(config_for("imagereward", "", ""), r"^config\.reward\.checkpoint must name an ImageReward\.pt file")
    one_line(config_for("hps", "", ""), r"^config\.reward\.checkpoint must name an HPS_v2\*\.pt file")
    one_line(config_for("imagereward", tmp_path / "ImageReward.pt", ""), r"^config\.reward\.checkpoint .* does not "
             r"exist")
    one_line(config_for("hps", tmp_path, ""), r"^config\.reward\.checkpoint .* is not a regular file")
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    one_line(config_for("imagereward", tmp_path / "ImageReward.pt", ""), r"^config\.reward\.checkpoint .*: no "
             r"med_config\.json beside it")
    (tmp_path / "med_config.json").write_text("{}")
    one_line(config_for("imagereward", tmp_path / "ImageReward.pt", ""), r"^config\.reward\.checkpoint .*: no BERT "
             r"tokenizer folder beside it")
    one_line(config_for("imagereward", IMAGEREWARD, "huge"), r"^config\.reward\.arch must be '' \(large\) or a BLIP "
             r"vision preset for reward 'imagereward' \(large, tiny\), got 'huge'")
    one_line(config_for("hps", HPS, "ViT-Q-99"), r"^config\.reward\.arch must be '' \(ViT-H-14\) or an OpenCLIP "
             r"architecture for reward 'hps' .*got 'ViT-Q-99'")
    bad_type = config_for("hps", HPS, "")
    with bad_type.ignore_type():
        bad_type.reward.checkpoint = 3
    one_line(bad_type, r"^config\.reward\.checkpoint must be a string, got 3")
    typo = config_for("hps", HPS, "")
    typo.unlock()
    typo.reward.chekpoint = str(HPS)
    one_line(typo, r"config\.reward\.chekpoint is not a config field \(did you mean config\.reward\.checkpoint\?\)")
    # A denoising-only run never loads the reward: its files are not required (the arch name still is checked).
    denoising = config_for("imagereward", "", "")
    denoising.loss.kind = "denoising"
    from safe_jax.train.config_check import validate_config

    validate_config(denoising, check_devices=False)
    denoising.reward.arch = "huge"
    one_line(denoising, r"^config\.reward\.arch ")
