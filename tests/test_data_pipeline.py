"""The input pipeline on one host: batches, augmentation, determinism, sharding, exact resume (orbax)."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from safe_jax.data import (  # noqa: E402
    InputConfig,
    data_sharding,
    data_source,
    global_batch,
    load_image,
    make_iterator,
)
from safe_jax.text.conditioning import DEFAULT_WEIGHT, subject_token_weights  # noqa: E402
from safe_jax.errors import SafeJaxError  # noqa: E402
from safe_jax.text.tokenizer import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """anchor/sample built once (about a second)."""
    path = tmp_path_factory.mktemp("tfds")
    data_source("anchor/sample", "train", str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def config(data_dir, **kw) -> InputConfig:
    base = dict(data_dir=data_dir, resolution=32, batch_size=4, worker_count=0, read_threads=2, crop="random")
    return InputConfig(**{**base, **kw})


def take(iterator, n):
    return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def test_batches_hold_images_in_unit_range_and_subject_weights(data_dir, tokenizer):
    (batch,) = take(make_iterator(config(data_dir, resolution=48, flip=False, crop="center",
                                                 image_dtype="float32"), tokenizer, shard=(0, 1)), 1)
    assert batch["images"].shape == (4, 48, 48, 3) and batch["images"].dtype == np.float32
    assert -1.0 <= batch["images"].min() < -0.5 and 0.5 < batch["images"].max() <= 1.0
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == np.int32
    assert batch["token_weights"].shape == (4, 77) and batch["token_weights"].dtype == np.float32
    assert set(np.unique(batch["token_weights"])) == {1.0, np.float32(DEFAULT_WEIGHT)}
    source = data_source("anchor/sample", "train", data_dir)
    by_id = {source[i]["image_id"]: source[i] for i in range(len(source))}
    for row, image_id in enumerate(batch["image_id"]):
        record = by_id[bytes(image_id)]
        caption = record["caption"].decode()
        subjects = [s.decode() for s in record["subjects"]]
        expected = subject_token_weights(tokenizer, [caption], [subjects])
        np.testing.assert_array_equal(batch["input_ids"][row], expected.ids[0])
        np.testing.assert_array_equal(batch["token_weights"][row], expected.weights[0])
        # centre crop, no flip: the stored image resized by its shorter side, middle square
        im = Image.open(io.BytesIO(record["image"]))
        w, h = im.size
        side = min(w, h)
        ref = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        ref = np.asarray(ref.resize((48, 48), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
        assert np.abs(batch["images"][row] - ref).mean() < 0.03


def test_load_image_crops_and_flips():
    pixels = np.zeros((60, 90, 3), np.uint8)
    pixels[:, :, 0] = np.arange(90)[None, :]  # red encodes the column
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    centre = load_image(data, 60, "center", dtype="uint8")
    assert centre.shape == (60, 60, 3) and centre[0, 0, 0] == 15 and centre[0, -1, 0] == 74  # no resampling
    lefts = {int(load_image(data, 60, "random", rng=np.random.default_rng(s), dtype="uint8")[0, 0, 0]) for s in range(40)}
    assert min(lefts) == 0 and max(lefts) == 30 and len(lefts) > 10
    flips = [load_image(data, 60, "center", True, np.random.default_rng(s), "uint8")[0, 0, 0] for s in range(40)]
    assert set(flips) == {15, 74}
    half = load_image(data, 30, "center", dtype="float32")
    assert half.shape == (30, 30, 3) and half.dtype == np.float32 and -1 <= half.min() and half.max() <= 1


def _encoded(width, height, fmt="PNG", seed=0) -> tuple[Image.Image, bytes]:
    """A noise image (any shift of a crop changes it) and its encoding."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return image, buf.getvalue()


def diffusers_sdxl_crop(image: Image.Image, resolution: int, flipped: bool, random_y1x1=None):
    """diffusers' train_text_to_image_sdxl.py preprocessing of one image, written out on PIL:
    original size (height, width); resize so the shorter side is ``resolution``; flip the resized
    image if ``flipped``; centre crop at y1 = max(0, int(round((H - R) / 2.0))), x1 likewise, or
    RandomCrop's ``(y1, x1)``; time ids = original size + (y1, x1) + (R, R). Returns (uint8 pixels,
    time ids). The longer side is rounded; torchvision truncates, so callers pick sizes where the
    two agree."""
    w, h = image.size
    longer = max(w, h) * resolution / min(w, h)
    assert int(longer) == round(longer), "a size where torchvision's truncation and rounding differ"
    rw, rh = (round(longer), resolution) if w >= h else (resolution, round(longer))
    resized = image.resize((rw, rh), Image.Resampling.BILINEAR)
    if flipped:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if random_y1x1 is None:
        y1 = max(0, int(round((rh - resolution) / 2.0)))
        x1 = max(0, int(round((rw - resolution) / 2.0)))
    else:
        y1, x1 = random_y1x1
    pixels = np.asarray(resized.crop((x1, y1, x1 + resolution, y1 + resolution)))
    return pixels, np.array([h, w, y1, x1, resolution, resolution], np.float32)


def same_pixels(a, b) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 1.0  # a 1-pixel shift: ~30


@pytest.mark.parametrize("width, height, resolution", [
    (63, 40, 40),   # landscape, no resampling, odd margin 23
    (90, 60, 40),   # landscape resized to 60 x 40
    (40, 57, 40),   # portrait, odd margin 17
    (40, 60, 24),   # portrait resized to 24 x 36
])
def test_sdxl_time_ids_of_a_centre_crop_are_diffusers(width, height, resolution):
    from safe_jax.data.transforms import load_image_and_time_ids

    image, data = _encoded(width, height)
    pixels, time_ids = load_image_and_time_ids(data, resolution, "center", dtype="uint8")
    ref_pixels, ref_ids = diffusers_sdxl_crop(image, resolution, flipped=False)
    assert time_ids.dtype == np.float32 and time_ids.shape == (6,)
    np.testing.assert_array_equal(time_ids, ref_ids)
    assert same_pixels(pixels, ref_pixels)
    assert time_ids[0] == height and time_ids[1] == width
    if width > height:
        assert time_ids[2] == 0 and time_ids[3] > 0
    else:
        assert time_ids[2] > 0 and time_ids[3] == 0


def test_sdxl_time_ids_follow_the_random_crop_and_the_flip_applied():
    """Every draw: the reported (y1, x1) is where diffusers' recipe (flip the resized image, then
    crop) gives these very pixels, with the flip these pixels had; crops cover the whole range and
    both flips occur."""
    from safe_jax.data.transforms import load_image_and_time_ids

    for (width, height, resolution) in [(90, 60, 40), (40, 57, 40)]:
        image, data = _encoded(width, height, seed=width)
        margin = max(width, height) * resolution // min(width, height) - resolution
        lefts, flips = set(), set()
        for seed in range(80):
            pixels, ids = load_image_and_time_ids(data, resolution, "random", True, np.random.default_rng(seed),
                                                  "uint8")
            y1, x1 = int(ids[2]), int(ids[3])
            matches = [f for f in (False, True)
                       if same_pixels(pixels, diffusers_sdxl_crop(image, resolution, f, (y1, x1))[0])]
            assert len(matches) == 1, (seed, ids)
            _, ref_ids = diffusers_sdxl_crop(image, resolution, matches[0], (y1, x1))
            np.testing.assert_array_equal(ids, ref_ids)
            flips.add(matches[0])
            lefts.add(x1 if width > height else y1)
            assert (y1 == 0) if width > height else (x1 == 0)
        assert flips == {False, True} and min(lefts) == 0 and max(lefts) == margin and len(lefts) > margin // 2


def test_sdxl_time_ids_of_a_flipped_centre_crop():
    """Even margin: exactly diffusers' numbers. Odd margin: the centre crop is taken before the flip
    (the pixels existing runs train on), so its left edge in the flipped image is one less than
    diffusers' round(margin / 2)."""
    from safe_jax.data.transforms import load_image_and_time_ids

    for (width, height, resolution, shift) in [(90, 60, 40, 0), (63, 40, 40, 1)]:
        image, data = _encoded(width, height)
        seen = set()
        for seed in range(12):
            pixels, ids = load_image_and_time_ids(data, resolution, "center", True, np.random.default_rng(seed),
                                                  "uint8")
            flipped = same_pixels(pixels, np.ascontiguousarray(
                load_image_and_time_ids(data, resolution, "center", dtype="uint8")[0][:, ::-1]))
            seen.add(flipped)
            _, ref_ids = diffusers_sdxl_crop(image, resolution, flipped)
            expected = ref_ids.copy()
            if flipped:
                expected[3] -= shift
            np.testing.assert_array_equal(ids, expected)
            assert same_pixels(pixels, diffusers_sdxl_crop(image, resolution, flipped, (int(ids[2]), int(ids[3])))[0])
        assert seen == {False, True}


def test_sdxl_time_ids_keep_the_source_size_through_a_jpeg_draft():
    from safe_jax.data.transforms import load_image_and_time_ids

    image, data = _encoded(200, 120, fmt="JPEG")
    assert Image.open(io.BytesIO(data)).draft("RGB", (54, 32)) is not None  # decoded at a reduced scale
    _, ids = load_image_and_time_ids(data, 32, "center", dtype="uint8")
    np.testing.assert_array_equal(ids, diffusers_sdxl_crop(image, 32, False)[1])
    assert tuple(ids[:2]) == (120, 200)


def test_micro_conditioning_changes_nothing_but_adds_time_ids():
    from safe_jax.data.transforms import DecodeImage, load_image_and_time_ids

    _, data = _encoded(90, 60)
    record = {"image": data, "image_id": b"id-1", "caption": b"a dog", "subjects": [b"dog"]}
    for crop in ("center", "random"):
        for dtype in ("uint8", "float32"):
            for seed in range(6):
                off = DecodeImage(40, crop, True, dtype).random_map(dict(record), np.random.default_rng(seed))
                on = DecodeImage(40, crop, True, dtype, micro_conditioning=True).random_map(
                    dict(record), np.random.default_rng(seed))
                assert "time_ids" not in off and set(on) == set(off) | {"time_ids"}
                assert on["image"].dtype == off["image"].dtype and on["image"].tobytes() == off["image"].tobytes()
                assert all(on[k] == off[k] for k in ("image_id", "caption", "subjects"))
                plain = load_image(data, 40, crop, True, np.random.default_rng(seed), dtype)
                assert plain.tobytes() == off["image"].tobytes()
                pixels, ids = load_image_and_time_ids(data, 40, crop, True, np.random.default_rng(seed), dtype)
                assert pixels.tobytes() == plain.tobytes()
                assert on["time_ids"].dtype == np.float32 and np.array_equal(on["time_ids"], ids)


def test_batches_with_micro_conditioning_carry_time_ids(data_dir, tokenizer):
    off = take(make_iterator(config(data_dir), tokenizer, shard=(0, 1)), 2)
    on = take(make_iterator(config(data_dir, micro_conditioning=True), tokenizer, shard=(0, 1)), 2)
    for a, b in zip(off, on):
        assert "time_ids" not in a and set(b) == set(a) | {"time_ids"}
        assert_same([a], [{k: v for k, v in b.items() if k != "time_ids"}])
        assert b["time_ids"].shape == (4, 6) and b["time_ids"].dtype == np.float32
    source = data_source("anchor/sample", "train", data_dir)
    by_id = {source[i]["image_id"]: source[i] for i in range(len(source))}
    for row, image_id in enumerate(on[0]["image_id"]):
        w, h = Image.open(io.BytesIO(by_id[bytes(image_id)]["image"])).size
        ids = on[0]["time_ids"][row]
        assert tuple(ids[:2]) == (h, w) and tuple(ids[4:]) == (32, 32)
        assert 0 <= ids[2] <= round(h * 32 / min(w, h)) - 32 and 0 <= ids[3] <= round(w * 32 / min(w, h)) - 32
    out = global_batch(on[0], data_sharding(jax.make_mesh((1,), ("data",)), "data"))
    assert out["time_ids"].shape == (4, 6) and out["time_ids"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["time_ids"]), on[0]["time_ids"])


def test_same_config_same_batches_and_epochs_reshuffle(data_dir, tokenizer):
    cfg = config(data_dir, batch_size=8)
    assert_same(take(make_iterator(cfg, tokenizer, shard=(0, 1)), 3), take(make_iterator(cfg, tokenizer, shard=(0, 1)), 3))
    other = take(make_iterator(config(data_dir, batch_size=8, seed=1), tokenizer, shard=(0, 1)), 1)[0]
    assert not np.array_equal(other["image_id"], take(make_iterator(cfg, tokenizer, shard=(0, 1)), 1)[0]["image_id"])
    # two epochs of the split: each a permutation of it, in a different order
    n = len(data_source("anchor/sample", "train", data_dir))
    assert 2 * n % 12 == 0  # whole batches of 12, so no record of the second epoch is dropped
    ids = np.concatenate([b["image_id"] for b in make_iterator(config(data_dir, batch_size=12, num_epochs=2,
                                                                        resolution=8), tokenizer, shard=(0, 1))])
    assert len(ids) == 2 * n and set(ids[:n]) == set(ids[n:]) and len(set(ids[:n])) == n
    assert list(ids[:n]) != list(ids[n:])


def test_shards_are_disjoint_and_cover_the_epoch(data_dir, tokenizer):
    seen = []
    for index in range(3):
        cfg = config(data_dir, batch_size=1, num_epochs=1, resolution=8, drop_remainder=False)
        seen.append([bytes(b["image_id"][0]) for b in make_iterator(cfg, tokenizer, shard=(index, 3))])
    n = len(data_source("anchor/sample", "train", data_dir))
    assert [len(s) for s in seen] == [len(range(index, n, 3)) for index in range(3)]
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[1]).isdisjoint(seen[2]) and set(seen[0]).isdisjoint(seen[2])
    assert len(set().union(*seen)) == n
    # the global stream does not depend on the number of hosts: host i of n takes positions i, i+n, ...
    single = [bytes(b["image_id"][0]) for b in make_iterator(
        config(data_dir, batch_size=1, num_epochs=1, resolution=8), tokenizer, shard=(0, 1))]
    assert seen[1] == single[1::3]


def test_resume_in_process_is_exact(data_dir, tokenizer):
    cfg = config(data_dir, batch_size=8, num_epochs=None)
    it = make_iterator(cfg, tokenizer, shard=(0, 1))
    assert 40 * 8 > len(data_source("anchor/sample", "train", data_dir))
    take(it, 40)  # past the first epoch (270 records: 33.75 batches): the state must carry the epoch too
    state = it.get_state()
    expected = take(it, 6)
    resumed = make_iterator(cfg, tokenizer, shard=(0, 1))
    resumed.set_state(state)
    assert_same(take(resumed, 6), expected)


def test_start_reads_on_like_an_uninterrupted_run_with_worker_processes(data_dir, tokenizer):
    """``start=k`` (2 worker processes) gives the batches an uninterrupted iterator gives after k,
    bit for bit, past the first epoch too: the data position a checkpoint records is the step."""
    cfg = config(data_dir, batch_size=8, worker_count=2, read_threads=1, resolution=24)
    expected = take(make_iterator(cfg, tokenizer, shard=(0, 1)), 37)[34:]  # 270 records: epoch 2 from batch 34
    assert_same(take(make_iterator(cfg, tokenizer, shard=(0, 1), start=34), 3), expected)
    assert expected[0]["images"].dtype == np.uint8 and expected[0]["images"].std() > 5  # real pictures
    with pytest.raises(SafeJaxError, match="start must be a global batch index"):
        make_iterator(cfg, tokenizer, shard=(0, 1), start=-1)


def test_global_position_is_the_same_on_any_number_of_hosts(data_dir, tokenizer):
    """Global batch 8 as 2 hosts × 4 or 1 host × 8, resumed at global batch 3: the same records,
    augmentations and time ids in the same order (an elastic restart reads on where it stopped)."""
    two = [take(make_iterator(config(data_dir, batch_size=4, micro_conditioning=True), tokenizer,
                              shard=(i, 2), start=3), 2) for i in range(2)]
    one = take(make_iterator(config(data_dir, batch_size=8, micro_conditioning=True), tokenizer,
                             shard=(0, 1), start=3), 2)
    for step in range(2):
        joined = {k: np.concatenate([two[0][step][k], two[1][step][k]]) for k in one[step]}
        assert_same([joined], [one[step]])


def test_global_batch_layout(data_dir, tokenizer):
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    (batch,) = take(make_iterator(config(data_dir, image_dtype="uint8"), tokenizer, shard=(0, 1)), 1)
    out = global_batch(batch, data_sharding(mesh, "data"))
    assert out["images"].shape == (4, 32, 32, 3) and out["images"].dtype == jnp.uint8
    assert out["images"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), batch["input_ids"])
    with pytest.raises(ValueError, match="data axes"):
        data_sharding(mesh, ("batch",))


def test_bad_settings_and_missing_data_are_clear_errors(data_dir, tokenizer, tmp_path):
    from safe_jax.data import DecodeImage
    from safe_jax.errors import SafeJaxError

    with pytest.raises(SafeJaxError, match="batch_size"):
        InputConfig(batch_size=0)
    with pytest.raises(SafeJaxError, match="crop"):
        DecodeImage(32, crop="diagonal")
    with pytest.raises(SafeJaxError, match="micro_conditioning"):
        InputConfig(micro_conditioning="yes")
    with pytest.raises(SafeJaxError, match="micro_conditioning"):
        DecodeImage(32, micro_conditioning=1)
    with pytest.raises(SafeJaxError, match="shard index"):
        make_iterator(config(data_dir), tokenizer, shard=(2, 2))
    with pytest.raises(SafeJaxError, match="anchor/default"):  # not built, and no manual directory
        data_source("anchor/default", "train", str(tmp_path))


def test_ctrl_c_does_not_kill_the_decode_workers(data_dir, tokenizer):
    """Ctrl-C in a terminal reaches the whole process group; the trainer saves and stops the
    workers itself, so they must outlive the signal and keep serving batches until then."""
    import multiprocessing
    import os
    import signal
    import time

    it = make_iterator(config(data_dir, worker_count=2), tokenizer, shard=(0, 1))
    try:
        next(it)
        workers = multiprocessing.active_children()
        assert len(workers) >= 2
        for w in workers:
            os.kill(w.pid, signal.SIGINT)
        time.sleep(2)
        assert all(w.is_alive() for w in workers)
        for _ in range(4):
            next(it)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
