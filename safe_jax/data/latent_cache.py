"""Optional caching pass: VAE latents and weighted text embeddings, precomputed into ArrayRecord.

Denoising-loss training then needs neither the VAE encoder nor the text encoder in the loop: each
step reads [h, w, 4] posterior statistics and [77, C] conditioning and samples the latent itself
(``sample_latents``). The pass runs the data pipeline in order (no shuffle, centre crop, no flip,
one epoch, every record), each process writing its own shard file; reading is a grain source.
Random flips are not cached (the latents of a flipped image are not the flipped latents).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from safe_jax import conditioning as cond
from safe_jax.data.pipeline import InputConfig, host_shard, make_iterator
from safe_jax.errors import SafeJaxError

INFO_NAME = "cache_info.json"
DTYPES = ("float16", "bfloat16", "float32")


def _shard_name(index: int, count: int) -> str:
    return f"latents-{index:05d}-of-{count:05d}.array_record"


def build_latent_cache(pipe: Any, params: dict, config: InputConfig, out_dir: str | Path, *,
                       dtype: str = "float16", weighting: str = "compel", limit: int | None = None) -> dict:
    """Encode every record of ``config``'s split (this process's shard) into ``out_dir``.

    ``pipe`` / ``params`` are a StableDiffusion and its parameters; ``config`` gives the dataset,
    resolution, batch size and subject weighting (its shuffle/crop/flip/epochs are overridden).
    ``limit`` stops after that many records (per process). Returns the cache info written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    from safe_jax.models.vae import AutoencoderKL

    if dtype not in DTYPES:
        raise SafeJaxError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
    config = dataclasses.replace(config, shuffle=False, num_epochs=1, crop="center", flip=False,
                                 drop_remainder=False, image_dtype="float32")
    index, count = host_shard()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encode_image = jax.jit(lambda vae_params, x: pipe.vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode))
    encode_text = jax.jit(pipe.conditioning, static_argnums=(3, 4))
    np_dtype = jnp.dtype(dtype)
    writer = ArrayRecordWriter(str(out / _shard_name(index, count)), "group_size:1")
    written = 0
    iterator = make_iterator(config, pipe.tokenizer, shard=(index, count))
    try:
        for batch in iterator:
            images = jnp.asarray(np.asarray(batch["image"]))
            ids, weights = np.asarray(batch["ids"]), np.asarray(batch["weights"])
            mean, logvar = encode_image(params["vae"], images)
            k = cond.count_downweighted(weights) if weighting == "compel" else 0
            text = encode_text(params["text_encoder"], jnp.asarray(ids), jnp.asarray(weights), weighting, k)
            mean, logvar, text = (np.asarray(a).astype(np_dtype) for a in (mean, logvar, text))
            for row, image_id in enumerate(np.asarray(batch["image_id"])):
                if limit is not None and written >= limit:
                    break
                writer.write(serialization.msgpack_serialize({
                    "image_id": bytes(image_id).decode("utf-8"),
                    "latent_mean": mean[row], "latent_logvar": logvar[row], "text_embedding": text[row],
                }))
                written += 1
            if limit is not None and written >= limit:
                break
    finally:
        writer.close()
        close = getattr(iterator, "close", None)
        if close:
            close()
    info = {
        "dataset": config.name, "split": config.split, "resolution": config.resolution,
        "subject_weight": config.subject_weight, "subject_format": config.subject_format, "weighting": weighting,
        "dtype": dtype, "scaling_factor": float(pipe.vae.config.scaling_factor),
        "latent_shape": list(mean.shape[1:]) if written else None,
        "text_shape": list(text.shape[1:]) if written else None,
        "processes": count, "records": {str(index): written},
    }
    info_path = out / (INFO_NAME if count == 1 else f"cache_info-{index:05d}.json")
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


class LatentCache:
    """The cache as a grain random-access source: records of ``image_id``, ``latent_mean``,
    ``latent_logvar`` [h, w, 4] and ``text_embedding`` [77, C]."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        files = sorted(directory.glob("latents-*.array_record"))
        if not files:
            raise SafeJaxError(f"{directory} holds no latent cache (latents-*.array_record)")
        infos = sorted(directory.glob("cache_info*.json"))
        self.info = json.loads(infos[0].read_text()) if infos else {}
        self._files = [str(f) for f in files]
        self._source = grain.sources.ArrayRecordDataSource(self._files)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = serialization.msgpack_restore(self._source[index])
        record["image_id"] = np.bytes_(record["image_id"].encode("utf-8"))
        return record

    def __repr__(self) -> str:  # grain checks the source's repr when restoring a state
        return f"LatentCache({self._files})"


def make_latent_dataset(directory: str | Path, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                        num_epochs: int | None = None, shard: tuple[int, int] | None = None,
                        read_threads: int = 2) -> grain.IterDataset:
    """Batches of cached records, shuffled, repeated and sharded exactly like ``make_dataset``."""
    index, count = shard if shard is not None else host_shard()
    ds = grain.MapDataset.source(LatentCache(directory)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)[index::count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size))
    return it.batch(batch_size, drop_remainder=True)


def sample_latents(mean: jax.Array, logvar: jax.Array, key: jax.Array, scaling_factor: float) -> jax.Array:
    """A draw from the cached VAE posterior, scaled as the UNet expects (diffusers' latent_dist.sample())."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * scaling_factor
