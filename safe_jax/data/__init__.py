"""The ANCHOR input pipeline: grain over ``tfds.data_source``, sharded by JAX process, resumable.

    config = InputConfig(name="anchor/sample", resolution=512, batch_size=4, seed=0)
    with GlobalBatches(make_iterator(config, pipe.tokenizer), mesh, "data") as batches:
        batch = next(batches)   # {"image": [B·P, 512, 512, 3] in [-1, 1], "ids": [B·P, 77], "weights": [B·P, 77]}

Save and restore its position with the train state: ``checkpoint.save_args`` / ``restore_args``.
``latent_cache`` precomputes VAE latents and text embeddings for encoder-free denoising training.
"""

from safe_jax.data.checkpoint import restore_args, save_args
from safe_jax.data.global_batch import GlobalBatches, data_sharding, global_batch
from safe_jax.data.latent_cache import LatentCache, build_latent_cache, make_latent_dataset, sample_latents
from safe_jax.data.pipeline import InputConfig, host_shard, make_dataset, make_iterator
from safe_jax.data.source import data_source
from safe_jax.data.transforms import DecodeImage, TokenizeWithSubjects, load_image, to_unit_range

__all__ = [
    "DecodeImage", "GlobalBatches", "InputConfig", "LatentCache", "TokenizeWithSubjects", "build_latent_cache",
    "data_sharding", "data_source", "global_batch", "host_shard", "load_image", "make_dataset", "make_iterator",
    "make_latent_dataset", "restore_args", "sample_latents", "save_args", "to_unit_range",
]
