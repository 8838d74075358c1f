"""The ANCHOR input pipeline: grain over ``tfds.data_source``, sharded by JAX process, resumable.

    config = InputConfig(name="anchor/sample", resolution=512, batch_size=4, seed=0)
    with GlobalBatches(make_iterator(config, pipe.tokenizer), mesh) as batches:
        batch = next(batches)   # {"images": [B·P, 512, 512, 3] in [-1, 1], "input_ids": [B·P, 77], "token_weights": [B·P, 77]}

Its position is saved and restored with the train state by ``safe_jax.train.checkpoints.Checkpointer``
(the grain iterator goes into the same orbax checkpoint), so a resume continues bit for bit.
``fill_missing_subjects`` finds subjects (offline) for records stored without any.
"""

from safe_jax.data.fill_subjects import fill_missing_subjects
from safe_jax.data.global_batch import GlobalBatches, data_sharding, global_batch
from safe_jax.data.input_pipeline import InputConfig, host_shard, make_dataset, make_iterator
from safe_jax.data.source import data_source
from safe_jax.data.transforms import DecodeImage, TokenizeWithSubjects, load_image, to_unit_range

__all__ = [
    "DecodeImage", "GlobalBatches", "InputConfig", "TokenizeWithSubjects", "data_sharding", "data_source",
    "fill_missing_subjects", "global_batch", "host_shard", "load_image", "make_dataset", "make_iterator",
    "to_unit_range",
]
