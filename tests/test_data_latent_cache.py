"""The caching pass: VAE posteriors and weighted text embeddings in ArrayRecord, equal to encoding
the same batches directly; read back as a grain source and as shuffled, sharded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("array_record")
pytest.importorskip("tensorflow_datasets")

from safe_jax.data import (  # noqa: E402
    InputConfig, LatentCache, build_latent_cache, data_source, make_iterator, make_latent_dataset, sample_latents,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny preset, anchor/sample, and a 10-record float32 cache of it at 32²."""
    from safe_jax.pipeline import StableDiffusion

    pipe, params = StableDiffusion.from_pretrained("tiny")
    tmp = tmp_path_factory.mktemp("latents")
    data_dir = str(tmp / "tfds")
    data_source("anchor/sample", "train", data_dir)
    cfg = InputConfig(data_dir=data_dir, resolution=32, batch_size=4, worker_count=0, seed=5)
    info = build_latent_cache(pipe, params, cfg, tmp / "cache", dtype="float32", limit=10)
    return pipe, params, data_dir, tmp / "cache", info


def test_latent_cache_matches_direct_encoding(built):
    from safe_jax.models.vae import AutoencoderKL

    pipe, params, data_dir, cache_dir, info = built
    assert info["records"] == {"0": 10} and info["latent_shape"] == [16, 16, 4]
    cache = LatentCache(cache_dir)
    assert len(cache) == 10 and cache.info["scaling_factor"] == pipe.vae.config.scaling_factor

    # the same records, in the same order, through the pipeline as the caching pass configures it
    plain = make_iterator(InputConfig(data_dir=data_dir, resolution=32, batch_size=4, worker_count=0, shuffle=False,
                                      num_epochs=1, flip=False, crop="center", drop_remainder=False,
                                      image_dtype="float32"), pipe.tokenizer,
                          shard=(0, 1))
    batches = [next(plain) for _ in range(3)]
    images = np.concatenate([b["image"] for b in batches])[:10]
    ids = np.concatenate([b["ids"] for b in batches])[:10]
    weights = np.concatenate([b["weights"] for b in batches])[:10]
    mean, logvar = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method=AutoencoderKL.encode))(
        params["vae"], jnp.asarray(images))
    text = pipe.conditioning(params["text_encoder"], jnp.asarray(ids), jnp.asarray(weights), "compel", 0)
    source = data_source("anchor/sample", "train", data_dir)
    for i in range(10):
        record = cache[i]
        assert record["image_id"] == source[i]["image_id"]
        np.testing.assert_allclose(record["latent_mean"], mean[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(record["latent_logvar"], logvar[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(record["text_embedding"], text[i], rtol=1e-5, atol=1e-5)
    unweighted = pipe.encode_prompt(params, [source[0]["caption"].decode()])
    assert not np.allclose(cache[0]["text_embedding"], unweighted[0])  # the subjects were up-weighted


def test_latent_dataset_batches_and_sampling(built):
    pipe, params, data_dir, cache_dir, info = built
    batch = next(iter(make_latent_dataset(cache_dir, 4, shard=(0, 1))))
    assert batch["latent_mean"].shape == (4, 16, 16, 4) and batch["latent_mean"].dtype == np.float32
    assert batch["text_embedding"].shape[:2] == (4, 77)
    z = sample_latents(jnp.asarray(batch["latent_mean"]), jnp.asarray(batch["latent_logvar"]), jax.random.key(0),
                       pipe.vae.config.scaling_factor)
    assert z.shape == (4, 16, 16, 4) and z.dtype == jnp.float32 and bool(jnp.isfinite(z).all())
    halves = [[bytes(i) for b in make_latent_dataset(cache_dir, 1, shard=(k, 2), num_epochs=1) for i in b["image_id"]]
              for k in range(2)]
    assert set(halves[0]).isdisjoint(halves[1]) and len(set(halves[0]) | set(halves[1])) == 10
