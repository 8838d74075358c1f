"""The evaluation's set-level and CLIP scores against the fixtures the references' own code wrote
(tests/reference/fixtures_metrics.py: clean-fid, transformers' CLIPProcessor, torchmetrics'
CLIPScore, PickScore's recipe, google-research/cmmd)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.eval import clip_scores, cmmd, frechet
from safe_jax.eval.preprocess import crop_square_resize, normalise, resize_shorter_crop, resize_shorter_crop_floor

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "metrics"


def load(name: str) -> dict[str, np.ndarray]:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} not written (make reference-fixtures)")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def seeded_image(fixture: dict, key: str) -> np.ndarray:
    """The fixture's input image, regenerated from its recipe and checked against its hash."""
    seed, h, w = (int(v) for v in fixture[f"{key}/spec"])
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert hashlib.sha256(image.tobytes()).hexdigest() == str(fixture[f"{key}/input_sha256"])
    return image


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["regular", "rank_deficient", "float32"])
def test_frechet_from_features_matches_cleanfid(case):
    fx = load("frechet.npz")
    a = frechet.FeatureStats.from_features(fx[f"{case}/f1"])
    b = frechet.FeatureStats.from_features(fx[f"{case}/f2"])
    assert a.mu.dtype == np.float64 and a.sigma.dtype == np.float64 and a.n == len(fx[f"{case}/f1"])
    np.testing.assert_array_equal(a.mu, fx[f"{case}/mu1"].astype(np.float64))
    np.testing.assert_array_equal(a.sigma, fx[f"{case}/sigma1"])
    ref = float(fx[f"{case}/fd"])
    # float32 features: clean-fid subtracts the float32 means in float32, we in float64.
    assert abs(frechet.frechet_distance(a, b) - ref) <= (1e-7 if case == "float32" else 1e-12) * abs(ref)


@pytest.mark.parametrize("case", ["regular", "rank_deficient", "offset"])
def test_frechet_distance_matches_cleanfid(case):
    fx = load("frechet.npz")
    a = frechet.FeatureStats(fx[f"{case}/mu1"], fx[f"{case}/sigma1"], 2)
    b = frechet.FeatureStats(fx[f"{case}/mu2"], fx[f"{case}/sigma2"], 2)
    ref = float(fx[f"{case}/fd"])
    assert abs(frechet.frechet_distance(a, b) - ref) <= 1e-12 * abs(ref)


def test_frechet_imaginary_component_is_an_error():
    fx = load("frechet.npz")
    assert str(fx["imaginary/error"]).startswith("Imaginary component")  # clean-fid raised
    a = frechet.FeatureStats(fx["imaginary/mu1"], fx["imaginary/sigma1"], 2)
    b = frechet.FeatureStats(fx["imaginary/mu2"], fx["imaginary/sigma2"], 2)
    with pytest.raises(SafeJaxError, match="imaginary component of 1"):
        frechet.frechet_distance(a, b)


def test_stats_cache_round_trip_and_key_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    stats = frechet.FeatureStats.from_features(rng.standard_normal((20, 5)))
    path = tmp_path / "cache" / "ref.npz"
    key = {"model": "clip-vit-base-patch32:abc", "preprocessing": "cleanfid_clip_224"}
    frechet.save_stats(path, stats, key)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary left behind
    loaded, meta = frechet.load_stats(path, expect={**key, "num_images": 20})
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 20 and meta == {**key, "num_images": 20}
    assert frechet.frechet_distance(loaded, stats) == pytest.approx(0.0, abs=1e-12)

    with pytest.raises(SafeJaxError, match=r"made differently: model 'clip-vit-base-patch32:abc' "
                                           r"\(wanted 'other'\); delete it") as e:
        frechet.load_stats(path, expect={**key, "model": "other"})
    assert "\n" not in str(e.value)
    with pytest.raises(SafeJaxError, match="num_images 20 \\(wanted 21\\)"):
        frechet.load_stats(path, expect={"num_images": 21})
    with pytest.raises(SafeJaxError, match="meta says 3 images"):
        frechet.save_stats(path, stats, {"num_images": 3})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SafeJaxError, match="not readable"):
        frechet.load_stats(tmp_path / "bad.npz")


def test_model_key_follows_the_weight_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "vocab.json").write_text("{}")
    key = frechet.model_key(tmp_path)
    (tmp_path / "vocab.json").write_text('{"b": 2}')  # not weights: same key
    assert frechet.model_key(tmp_path) == key
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert frechet.model_key(tmp_path) != key


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def test_fid_clip_preprocessing_equals_cleanfid():
    fx = load("preprocess_cleanfid.npz")
    for i in range(3):
        image = seeded_image(fx, str(i))
        np.testing.assert_array_equal(resize_shorter_crop(image, 224), fx[f"{i}/output"], err_msg=f"image {i}")
        # clean-fid: ToTensor · 255, then CLIP_fx's / 255 and Normalize: exactly ``normalise``.
        assert clip_scores.fid_clip_pixels(image).shape == (224, 224, 3)


def test_clip_processor_preprocessing_equals_transformers():
    fx = load("preprocess_hf.npz")
    for i in range(4):
        image = seeded_image(fx, str(i))
        np.testing.assert_array_equal(resize_shorter_crop_floor(image, 64), fx[f"{i}/pixels"], err_msg=f"image {i}")
        if f"{i}/pixel_values" in fx:
            np.testing.assert_array_equal(clip_scores.clip_processor_pixels(image, 64),
                                          fx[f"{i}/pixel_values"].transpose(1, 2, 0))
    # 90x134 -> 64x95: the processor's crop starts at 15, torchvision's (clean-fid's) at 16.
    image = seeded_image(fx, "1")
    np.testing.assert_array_equal(resize_shorter_crop(image, 64)[:, :-1], fx["1/pixels"][:, 1:])


def test_cmmd_preprocessing_equals_reference():
    fx = load("cmmd.npz")
    size = fx["image0/resized"].shape[0]
    for i in range(4):
        image = seeded_image(fx, f"image{i}")
        np.testing.assert_array_equal(crop_square_resize(image, size), fx[f"image{i}/resized"], err_msg=f"image {i}")
    if "image0/pixels" in fx:
        image = seeded_image(fx, "image0")
        np.testing.assert_array_equal(cmmd.cmmd_pixels(image, size), fx["image0/pixels"])
        np.testing.assert_array_equal(cmmd.preprocess([image, image], size)[1], fx["image0/pixels"])
        # True division differs from the reference's reciprocal product by at most 1 ulp.
        np.testing.assert_allclose(normalise(crop_square_resize(image, size)), fx["image0/pixels"],
                                   rtol=3e-7, atol=3e-7)


# ---------------------------------------------------------------------------------------------
# CMMD
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["shifted", "same_distribution", "wide"])
def test_mmd_matches_reference(case):
    fx = load("cmmd.npz")
    x, y = fx[f"{case}/x"], fx[f"{case}/y"]
    ours = cmmd.mmd(x, y)
    assert ours == pytest.approx(float(fx[f"{case}/mmd_float64"]), rel=1e-5)
    # The reference as it runs (float32) is itself ~1e-4 off its float64 value.
    assert ours == pytest.approx(float(fx[f"{case}/mmd_float32"]), rel=5e-4)


def test_mmd_tiles_and_sizes():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    y = (rng.standard_normal((170, 24)) + 0.3).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    whole = cmmd.mmd(x, y)
    assert cmmd.mmd(x, y, tile=128) == pytest.approx(whole, rel=1e-6)  # 3 x 2 tiles, padded
    assert cmmd.mmd(y, x) == pytest.approx(whole, rel=1e-6)
    assert abs(cmmd.mmd(x, x)) < 1e-9
    with pytest.raises(SafeJaxError, match="one width"):
        cmmd.mmd(x, y[:, :5])


# ---------------------------------------------------------------------------------------------
# CLIPScore, PickScore
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    from safe_jax.text.tokenizer import load_tokenizer

    fx = load("clipscore.npz")
    folder = FIXTURES / "clip_tiny"
    return fx, clip_scores.CLIPFeatures.from_folder(folder, batch_size=3), load_tokenizer(folder)


def test_clipscore_matches_torchmetrics(tiny_clip):
    fx, features, tokenizer = tiny_clip
    captions = [str(c) for c in fx["captions"]]
    images = [fx[f"image{i}"] for i in range(len(captions))]
    pixels = np.stack([clip_scores.clip_processor_pixels(image, features.image_size) for image in images])
    np.testing.assert_array_equal(pixels, fx["torchmetrics/pixel_values"].transpose(0, 2, 3, 1))
    ids = clip_scores.torchmetrics_input_ids(tokenizer, captions)
    np.testing.assert_array_equal(ids, fx["torchmetrics/input_ids"])  # the long caption lost its EOS
    assert ids[-1, -1] != tokenizer.eos_token_id

    image_features = features.image_features(pixels)  # 4 images in batches of 3: the last padded
    text_features = features.text_features(ids)
    assert rel(image_features, fx["torchmetrics/image_features"]) < 1e-5
    assert rel(text_features, fx["torchmetrics/text_features"]) < 1e-5
    per_image = np.asarray(clip_scores.clipscore_per_image(image_features, text_features))
    np.testing.assert_allclose(per_image, fx["torchmetrics/per_sample"], rtol=1e-5)
    assert (per_image < 0).any()  # torchmetrics does not clamp per sample
    score = float(clip_scores.clipscore(image_features, text_features))
    assert score == pytest.approx(float(fx["torchmetrics/compute"]), rel=1e-5)
    assert score == pytest.approx(float(fx["torchmetrics/functional"]), rel=1e-5)
    assert float(clip_scores.clipscore(image_features[2:3], text_features[2:3])) == 0.0
    assert float(fx["torchmetrics/compute_negative"]) == 0.0


def test_pickscore_matches_recipe(tiny_clip):
    from safe_jax.text.tokenizer import tokenize

    fx, features, tokenizer = tiny_clip
    captions = [str(c) for c in fx["captions"]]
    ids = tokenize(tokenizer, captions, 77)
    np.testing.assert_array_equal(ids[:, :fx["pickscore/input_ids"].shape[1]], fx["pickscore/input_ids"])
    pixels = np.stack([clip_scores.clip_processor_pixels(fx[f"image{i}"], features.image_size)
                       for i in range(len(captions))])
    np.testing.assert_array_equal(pixels, fx["pickscore/pixel_values"].transpose(0, 2, 3, 1))
    image, text = features.image_features(pixels), features.text_features(ids)
    n = len(captions)
    scores = clip_scores.pickscore(np.tile(image, (n, 1)), np.repeat(text, n, axis=0), features.logit_scale)
    np.testing.assert_allclose(np.asarray(scores).reshape(n, n), fx["pickscore/scores"], rtol=1e-5)


def test_clip_features_batches_agree(tiny_clip):
    fx, features, _ = tiny_clip
    pixels = np.stack([clip_scores.clip_processor_pixels(fx[f"image{i}"], features.image_size) for i in range(4)])
    whole = features.image_features(pixels)
    one_by_one = np.concatenate([features.image_features(pixels[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(features.image_embeds(pixels), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(SafeJaxError, match="pixels"):
        features.image_features(pixels[:, :16])


def test_world_recall_finds_the_subjects_of_real_world_pictures_and_none_in_noise():
    """The ground-truth metric: the world's own pictures score high, noise scores zero, subjects the
    world never draws are not judged, and the identity follows the detector's code."""
    from safe_jax.eval.metrics import check_prompts, make_metric
    from safe_jax.eval.prompts import EvalPrompt, Subject
    from tfds_anchor.anchor import world

    examples = [world.example(5, i, 64) for i in range(12)]
    prompts = [EvalPrompt(f"p{i}", e["caption"], tuple(Subject(s["text"], s["kind"]) for s in e["subjects"]))
               for i, e in enumerate(examples)]
    metric = make_metric("world_recall", {})
    assert metric.identity.startswith("world_recall:v1:") and metric.checkpoint is None
    real = metric.score([e["image"] for e in examples], prompts)
    assert np.mean([r["world_recall"] for r in real]) >= 0.8
    assert all(0.0 <= v <= 1.0 for r in real for v in r.values())
    assert any(k.startswith("world_recall.") for r in real for k in r)
    noise = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    assert all(r["world_recall"] == 0.0 for r in metric.score(list(noise), prompts))
    unknown = [EvalPrompt("x", "Reporters wait.", (Subject("reporters"),))]
    assert metric.score([examples[0]["image"]], unknown) == [{}]
    with pytest.raises(SafeJaxError, match="no prompt names one"):
        check_prompts(["world_recall"], unknown)
