"""TFDS builders of this project. ``import tfds_anchor`` registers ``anchor`` with TFDS.

Then ``tfds.data_source("anchor/sample")``, ``tfds.load("anchor/default", ...)`` and
``tfds build anchor --imports tfds_anchor --manual_dir DIR`` find it. A build that keeps no record
raises ``NoRecordKept`` (a ValueError) naming the reasons; a layout or setting that cannot work
raises ``LayoutError`` (a ValueError) before any record is read.
"""

from tfds_anchor.anchor.anchor_dataset_builder import AnchorConfig, Builder, NoRecordKept
from tfds_anchor.anchor.layouts.settings import LayoutError

__all__ = ["AnchorConfig", "Builder", "LayoutError", "NoRecordKept"]
