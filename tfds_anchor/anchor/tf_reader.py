"""``tfds.load`` / ``builder.as_dataset`` over ArrayRecord files, for TensorFlow users.

TFDS reads ArrayRecord only through ``tfds.data_source``; its tf.data reader handles TFRecord alone.
Rather than store the dataset twice, we read ArrayRecord by index inside tf.data: an index range
(sharded by ``input_context``, shuffled when ``shuffle_files``) → the serialized tf.Example of that
index (random access, in parallel) → TFDS's own parse and decode.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import decode


def as_tf_dataset(builder: tfds.core.DatasetBuilder, split: Any, decoders: Any,
                  read_config: tfds.ReadConfig, shuffle_files: bool) -> tf.data.Dataset:
    if isinstance(decoders, decode.PartialDecoding):
        raise NotImplementedError("anchor: PartialDecoding is not supported; pass a dict of decoders")
    source = builder.as_data_source(split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
    features = builder.info.features

    def read(index):
        return source[int(index)]

    def serialized(index: tf.Tensor) -> tf.Tensor:
        record = tf.numpy_function(read, [index], tf.string, stateful=False)
        record.set_shape([])
        return record

    ds = tf.data.Dataset.range(len(source))
    context = read_config.input_context
    if context is not None and context.num_input_pipelines > 1:
        ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
    if shuffle_files:
        ds = ds.shuffle(len(source), seed=read_config.shuffle_seed,
                        reshuffle_each_iteration=read_config.shuffle_reshuffle_each_iteration)
    ds = ds.map(serialized, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda s: features.deserialize_example(s, decoders=decoders), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.with_options(read_config.options)
