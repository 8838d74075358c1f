"""DatasetBuilderTestCase for every config (needs TensorFlow: ``pip install -e '.[tf]'``).

Run with ``python -m pytest tfds_anchor/anchor/anchor_dataset_builder_test.py`` (CI collects these
classes through tests/test_tfds_anchor_tf.py). dummy_data/ is a manual directory with 13 good
records (9 non-entity, 4 entity) and 2 bad ones (a missing image, an empty caption); ``sample``
ignores it (it draws the synthetic world). ``synthetic`` (20,000 records) is not built here: it is
``sample``'s world, larger, and tests/test_tfds_anchor.py builds a small config of its subset.
"""

import tensorflow_datasets as tfds

from tfds_anchor.anchor import anchor_dataset_builder


class _Anchor:
    """A mixin, not a TestCase (so it is not collected itself). The builder makes no network call:
    records without subjects are stored with an empty list."""

    DATASET_CLASS = anchor_dataset_builder.Builder


class AnchorDefaultTest(_Anchor, tfds.testing.DatasetBuilderTestCase):
    BUILDER_CONFIG_NAMES_TO_TEST = ["default"]
    SPLITS = {"train": 5, "validation": 2, "test": 2}


class AnchorEntityTest(_Anchor, tfds.testing.DatasetBuilderTestCase):
    BUILDER_CONFIG_NAMES_TO_TEST = ["entity"]
    SPLITS = {"train": 2, "validation": 1, "test": 1}


class AnchorSampleTest(_Anchor, tfds.testing.DatasetBuilderTestCase):
    BUILDER_CONFIG_NAMES_TO_TEST = ["sample"]
    SPLITS = {"train": 270, "validation": 12, "test": 18}


if __name__ == "__main__":
    tfds.testing.test_main()
