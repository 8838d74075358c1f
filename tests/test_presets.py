"""The shipped presets: the synthetic world's models load offline, by name, and draw the world.

`tiny-anchor` must draw pictures (not noise) for captions it never trained on, load in diffusers'
StableDiffusionPipeline and draw the same pictures there; the reward and judge CLIPs must read
the world (caption retrieval far above chance). `launch/ship_world.py` must refuse what would not
load or would not fit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.io import presets
from safe_jax.pretrain.data import HELD_OUT_SEED  # the seed pre-training never trains on
from tfds_anchor.anchor import world, world_detect


def _held_out(n: int, size: int = 64) -> list[dict]:
    """The first ``n`` held-out examples whose subject combination is not in the training split."""
    examples, i = [], 0
    while len(examples) < n:
        e = world.example(HELD_OUT_SEED, i, size)
        if e["split"] != "train":
            examples.append(e)
        i += 1
    return examples


def _neighbour_correlation(image: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels: ~1 for pictures, ~0 for noise."""
    x = image.astype(np.float64).mean(axis=-1)
    return float(np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1])


@pytest.fixture(scope="module")
def tiny_anchor():
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained("tiny-anchor")


def test_tiny_anchor_draws_the_world_for_held_out_captions(tiny_anchor):
    pipe, params = tiny_anchor
    examples = _held_out(4)
    images = pipe.generate(params, [e["caption"] for e in examples], num_steps=20, guidance_scale=4.0, seed=0)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    for image, fake in zip(images, noise):
        # a picture: smooth where noise is not, and with the world's sky across its top
        assert _neighbour_correlation(image) > 0.8 > 0.2 > _neighbour_correlation(fake)
        assert world_detect.detect(image)["sky"] >= 0.5 > world_detect.detect(fake)["sky"]
    # nearer the real held-out pictures than noise is: mean colour per picture
    real = np.stack([e["image"] for e in examples]).astype(np.float64)
    gap = lambda x: np.abs(x.astype(np.float64).mean(axis=(1, 2)) - real.mean(axis=(1, 2))).mean()  # noqa: E731
    assert gap(images) < 0.5 * gap(noise)


def test_tiny_anchor_draws_the_same_pictures_in_diffusers(tiny_anchor):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe, params = tiny_anchor
    captions = [e["caption"] for e in _held_out(2)]
    torch_pipe = StableDiffusionPipeline.from_pretrained(presets.resolve("tiny-anchor"), torch_dtype=torch.float32)
    s = pipe.unet.config.sample_size
    latents = np.random.RandomState(3).randn(2, 4, s, s).astype(np.float32)
    ours = pipe.generate(params, captions, num_steps=10, guidance_scale=4.0, latents=latents)
    with torch.no_grad():
        theirs = torch_pipe(captions, num_inference_steps=10, guidance_scale=4.0, latents=torch.from_numpy(latents),
                            output_type="np").images
    assert np.abs(ours / 255.0 - theirs).mean() <= 1 / 255


@pytest.mark.parametrize("name", ["tiny-anchor-reward", "tiny-anchor-judge"])
def test_clip_presets_read_the_world(name):
    """Each CLIP finds the right caption among 16 held-out ones for most pictures (chance: 1/16)."""
    from safe_jax.eval.clip_scores import CLIPFeatures
    from safe_jax.text.tokenizer import tokenize
    from safe_jax.train.rewards import clip_tokenizer

    folder = presets.resolve(name)
    clip = CLIPFeatures.from_folder(folder, 16)
    examples = _held_out(16, clip.image_size)
    ids = tokenize(clip_tokenizer(folder), [e["caption"] for e in examples], clip.model.config.text.max_position_embeddings)
    from safe_jax.eval.clip_scores import clip_processor_pixels

    images = clip.image_embeds(np.stack([clip_processor_pixels(e["image"], clip.image_size) for e in examples]))
    texts = clip.text_embeds(ids)
    top1 = np.mean(np.argmax(np.asarray(images) @ np.asarray(texts).T, axis=1) == np.arange(16))
    assert top1 >= 0.5, top1


def test_presets_are_fp16_and_within_the_budget():
    from safetensors.numpy import load_file

    total = sum(f.stat().st_size for f in presets.WEIGHTS.rglob("*") if f.is_file())
    assert total <= 25 * 10 ** 6
    for f in presets.WEIGHTS.rglob("*.safetensors"):
        assert {v.dtype for v in load_file(f).values()} == {np.dtype(np.float16)}, f
    provenance = json.loads((presets.WEIGHTS / "provenance.json").read_text())
    assert set(provenance) == set(presets.SHIPPED) and not any(p["quick"] for p in provenance.values())


def test_a_missing_preset_is_one_clear_line(monkeypatch, tmp_path):
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    monkeypatch.setattr(presets, "WEIGHTS", tmp_path)
    with pytest.raises(SafeJaxError, match="preset 'tiny-anchor' is not in this installation.*make world"):
        StableDiffusion.from_pretrained("tiny-anchor")
    assert presets.resolve("some/folder") == "some/folder"


def test_ship_world_refuses_unfinished_runs_and_overweight_models(tmp_path):
    from launch import ship_world

    with pytest.raises(SafeJaxError, match="no finished export"):
        ship_world.ship(tmp_path / "runs", tmp_path / "weights")
    runs = tmp_path / "runs"
    for name, run in ship_world.PARTS.items():
        export = runs / run / "export"
        export.mkdir(parents=True)
        (export / ("model_index.json" if name == "tiny-anchor" else "config.json")).write_text("{}")
    (runs / "unet" / "export" / "big.safetensors").write_bytes(b"\0" * (ship_world.BUDGET_BYTES + 1))
    with pytest.raises(SafeJaxError, match="over the package's 25 MB"):
        ship_world.ship(runs, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()
