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
    GlobalBatches,
    InputConfig,
    data_sharding,
    data_source,
    global_batch,
    load_image,
    make_iterator,
)
from safe_jax.text.conditioning import DEFAULT_WEIGHT, subject_token_weights  # noqa: E402
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


def test_resume_through_orbax_with_worker_processes(data_dir, tokenizer, tmp_path):
    """Save the train state and the iterator (2 worker processes) with the training Checkpointer
    (orbax); restore in a fresh iterator; the next global batches equal the uninterrupted run's,
    bit for bit."""
    import orbax.checkpoint as ocp

    from safe_jax.train.checkpoints import Checkpointer

    cfg = config(data_dir, batch_size=2, worker_count=2, read_threads=1, resolution=24)
    mesh = jax.make_mesh((1,), ("data",))
    train_state = {"step": jnp.array(3), "w": jnp.arange(4.0)}
    with GlobalBatches(make_iterator(cfg, tokenizer, shard=(0, 1)), mesh) as batches:
        for _ in range(5):
            next(batches)
        with Checkpointer(tmp_path / "ckpt", best_metric=None) as checkpointer:
            checkpointer.save(5, train_state, batches, config={"data": "anchor/sample"})
            checkpointer.wait()
        expected = [{k: np.asarray(v) for k, v in next(batches).items()} for _ in range(4)]
    assert (tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").is_file()

    with GlobalBatches(make_iterator(cfg, tokenizer, shard=(0, 1)), mesh) as fresh:
        with Checkpointer(tmp_path / "ckpt", best_metric=None) as checkpointer:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
            restored, _, step = checkpointer.restore_latest(abstract, fresh)
        assert step == 5
        np.testing.assert_array_equal(restored["w"], train_state["w"])
        got = [{k: np.asarray(v) for k, v in next(fresh).items()} for _ in range(4)]
    assert_same(got, expected)
    assert set(got[0]) == {"images", "input_ids", "token_weights"}  # strings stay on the host
    assert got[0]["images"].dtype == np.float32 and -1 <= got[0]["images"].min() < got[0]["images"].max() <= 1


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
