"""The ANCHOR records as a grain random-access source, via ``tfds.data_source`` (no TensorFlow).

Images stay encoded (``SkipDecoding``): our transform decodes them itself, at reduced DCT scale
when the stored image is much larger than the training resolution, which is far cheaper than a
full decode followed by a resize.
"""

from __future__ import annotations

from typing import Any

from safe_jax.errors import SafeJaxError


def data_source(name: str = "anchor/sample", split: str = "train", data_dir: str | None = None,
                download: bool = True) -> Any:
    """``tfds.data_source(name, split)`` with images left as JPEG bytes; a grain RandomAccessDataSource.

    ``download=True`` builds the dataset first when it is not there (``anchor/sample`` builds in
    about a second; the other configs need their manual directory).
    """
    import tensorflow_datasets as tfds

    import tfds_anchor  # registers the anchor builder

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except tfds_anchor.NoRecordKept as e:  # its message names the reasons and the build report
        raise SafeJaxError(str(e)) from e
    except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError) as e:
        raise SafeJaxError(f"cannot open the data source {name!r} split {split!r}: {e}") from e


def as_text(value: Any) -> str:
    """TFDS returns Text features as bytes (numpy decoding); we want str."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def as_texts(values: Any) -> list[str]:
    return [as_text(v) for v in (values if values is not None else [])]
