"""ANCHOR: news image–caption pairs with their key subjects (SAFE's training and test data).

The images come from licensed news datasets, so the builder reads a manual directory whose layout
we define (README.md, MANUAL_DOWNLOAD_INSTRUCTIONS). ``sample`` needs none: it draws a few hundred
news-like pairs itself, so demos and tests run offline.

Building and reading through ``tfds.data_source`` need no TensorFlow: images are decoded and encoded
with PIL here and records are written as ArrayRecord.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import tensorflow_datasets as tfds
from etils import epath

from tfds_anchor.anchor import images, manual, synthetic
from tfds_anchor.anchor.build_report import (
    FAILED_REPORT_TEMPLATE,
    REPORT_FILENAME,
    BuildReport,
    NoRecordKept,
    read_report,
)
from tfds_anchor.anchor.sources import SOURCES, normalise_source

log = logging.getLogger("tfds_anchor")

_HOMEPAGE = "https://zenodo.org/records/10974908"
SUBSETS = ("non_entity", "entity", "synthetic")


@dataclasses.dataclass(eq=False)
class AnchorConfig(tfds.core.BuilderConfig):
    """Which records, and how images are stored.

    ``max_side`` caps the longest side of stored images (768 keeps a 3:2 photo's shorter side at 512,
    SD 1.x's training size; raise it for 768² training). ``min_side`` is the smallest shorter side
    kept. Subjects are data, not computed here: a record's own ``subjects``, else its line in the
    manual directory's ``subjects.jsonl`` (found before the build), else an empty list.
    """

    subset: str = "non_entity"
    max_side: int = 768
    min_side: int = 64
    jpeg_quality: int = 90
    synthetic_examples: int = 300
    synthetic_size: tuple[int, int] = (192, 128)
    synthetic_seed: int = 0

    def __post_init__(self):
        if self.subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {self.subset!r}")
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(f"need 0 < min_side <= max_side, got {self.min_side} and {self.max_side}")


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for ANCHOR (and its offline ``sample``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: default (non-entity), entity and sample configs."}
    BUILDER_CONFIGS = [
        AnchorConfig(name="default", subset="non_entity",
                     description="ANCHOR's non-entity subset, from a manual directory."),
        AnchorConfig(name="entity", subset="entity",
                     description="ANCHOR Entity: pairs whose image shows a named person (field `entity`)."),
        AnchorConfig(name="sample", subset="synthetic",
                     description="300 synthetic news-like pairs drawn offline by our own code, for demos and tests."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    ANCHOR's captions and metadata are released on Zenodo (record 10974908,
    https://zenodo.org/records/10974908); its images come from licensed news datasets
    (VisualNews: The Guardian, BBC, USA Today, The Washington Post; GoodNews / NYTimes800k:
    The New York Times), which you obtain from their owners under their terms.

    Put in the manual directory (`--manual_dir`, default ~/tensorflow_datasets/downloads/manual/):

      anchor.jsonl   one JSON object a line:
                       {"id": "...", "caption": "...", "source": "The Guardian",
                        "image": "images/000123.jpg",            # relative to the manual directory
                        "subjects": ["Boris Johnson", "Tower Bridge"],  # optional
                        "entity": "Boris Johnson",               # optional: marks ANCHOR Entity records
                        "split": "train"}                        # optional: train / validation / test
                     (or anchor.csv with the same columns; `subjects` as a JSON list or `;`-separated)
      images/...     the image files (any format PIL reads)
      subjects.jsonl optional: {"id": "...", "subjects": [...]} a line, for records without
                     `subjects`; write it before the build with
                       safe-jax subjects --manual-dir <manual directory>

    Extra fields are ignored. The build computes no subjects: a record with none in either file is
    stored with an empty list (the input pipeline can fill it). Records without `split` are split
    by a hash of their id (90/5/5). Bad records are skipped and counted in
    build_report.json next to the built dataset; a build that keeps no record at all fails,
    naming the reasons.
    """

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        # ArrayRecord by default: random access for grain, and no TensorFlow needed to read it.
        super().__init__(file_format=file_format or "array_record", **kwargs)
        # The version directory the dataset ends in. While it is built, ``data_path`` is a temporary
        # ``incomplete.*`` sibling that TFDS renames at the end (or deletes on failure).
        self._final_data_path = self.data_path
        self.report_path: epath.Path | None = None  # build_report.json of the finished build

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image_id": tfds.features.Text(),
                "caption": tfds.features.Text(),
                "source": tfds.features.ClassLabel(names=list(SOURCES)),
                "subjects": tfds.features.Sequence(tfds.features.Text()),
                "entity": tfds.features.Text(),
            }),
            supervised_keys=None,
            homepage=_HOMEPAGE,
        )

    # ------------------------------------------------------------------ generation
    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        config: AnchorConfig = self.builder_config
        self._report = report = BuildReport(config=config.name)
        if config.subset == "synthetic":
            records = list(synthetic.pairs(config.synthetic_examples, config.synthetic_seed, config.synthetic_size,
                                           config.jpeg_quality))
            report.records_read = len(records)
            root = None
        else:
            root = epath.Path(dl_manager.manual_dir)
            records = manual.read_records(root, report)
            wanted = config.subset == "entity"
            others = sum(bool(r.entity) != wanted for r in records)
            if others:
                report.note(f"records of the other subset ({'non-entity' if wanted else 'entity'}), not in this config",
                            others)
            records = [r for r in records if bool(r.entity) == wanted]
            records = self._usable_images(records, root, report)
            manual.add_subjects(records, root, report)
        if not records:
            self._fail_nothing_kept(report, root)
        missing = sum(r.subjects is None for r in records)
        if missing:
            report.note(f"records without subjects, stored with an empty list (none given, and none in "
                        f"{manual.SUBJECTS_NAME})", missing)
        by_split: dict[str, list[manual.Record]] = {}
        for r in records:
            by_split.setdefault(r.split, []).append(r)
        # A split with no record while others have some is a warning, not an error: manual data may
        # carry only the splits it has (its own `split` field), and hash-splitting a small directory
        # can leave validation or test empty. TFDS then has no such split, and reading it fails at
        # once with TFDS's "Unknown split" error naming the splits there are. (Zero records in every
        # split is the error above: TFDS would mark such a dataset prepared and fail much later.)
        for split in manual.SPLITS:
            if split not in by_split:
                report.note(f"split {split!r} has no record and is not in the dataset")
                log.warning("anchor/%s: no record in split %r; the dataset has only %s", config.name, split,
                            ", ".join(s for s in manual.SPLITS if s in by_split))
        return {split: self._generate_examples(by_split[split], root) for split in manual.SPLITS if split in by_split}

    def _fail_nothing_kept(self, report: BuildReport, root: epath.Path | None) -> None:
        """Every record was skipped: write the report where it outlives the failed build, and raise."""
        config: AnchorConfig = self.builder_config
        origin = f"from {root}" if root is not None else f"(synthetic_examples={config.synthetic_examples})"
        where = ""
        try:
            directory = self._final_data_path.parent
            directory.mkdir(parents=True, exist_ok=True)
            path = report.write(directory, FAILED_REPORT_TEMPLATE.format(version=self.version))
            where = f" (see the build report at {path})"
        except OSError as e:  # a read-only data_dir: the message alone still says why
            log.warning("could not write the build report: %s", e)
        print("\n" + report.summary(), flush=True)
        raise NoRecordKept(f"anchor/{config.name}: no record kept {origin}: {report.why_nothing_kept()}{where}")

    def _usable_images(self, records: list[manual.Record], root: epath.Path, report: BuildReport) -> list[manual.Record]:
        """First pass: which images decode, so that every split written is known not to be empty."""
        config: AnchorConfig = self.builder_config

        def verdict(record: manual.Record) -> tuple[str | None, str | None]:
            data = _read(root, record.image)
            if data is None:
                return "missing_image", None
            try:
                return None, images.check(data, min_side=config.min_side)
            except images.BadImage as e:
                return e.reason, None

        kept = []
        for record, (reason, mode) in zip(records, images.parallel_map(verdict, records)):
            if reason:
                report.skip(reason, record.id)
            else:
                if mode:
                    report.converted[mode] += 1
                kept.append(record)
        return kept

    def _generate_examples(self, records: list[manual.Record], root: epath.Path | None):
        config: AnchorConfig = self.builder_config
        report = self._report

        def prepared(record: manual.Record) -> images.Prepared | str:
            data = record.image_bytes if record.image_bytes is not None else _read(root, record.image)
            if data is None:
                return "missing_image"  # deleted between the two passes
            try:
                return images.prepare(data, max_side=config.max_side, min_side=config.min_side,
                                      quality=config.jpeg_quality)
            except images.BadImage as e:
                return e.reason

        for record, image in zip(records, images.parallel_map(prepared, records)):
            if isinstance(image, str):
                report.skip(image, record.id)
                continue
            if image.reencoded and record.image_bytes is None:
                report.note("images re-encoded (converted, rotated or larger than max_side)")
            report.kept[record.split] += 1
            yield record.id, {
                "image": image.jpeg,
                "image_id": record.id,
                "caption": record.caption,
                "source": normalise_source(record.source),
                "subjects": record.subjects or [],
                "entity": record.entity if config.subset == "entity" else "",
            }

    def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):  # pytype: disable=signature-mismatch
        """tf.data over the ArrayRecord files (TFDS itself reads only TFRecord into tf.data)."""
        read_config = read_config or tfds.ReadConfig()
        file_format = read_config.file_format or self.info.file_format
        if tfds.core.file_adapters.FileFormat.from_value(file_format).value != "array_record":
            return super()._as_dataset(split, decoders, read_config, shuffle_files)
        from tfds_anchor.anchor import tf_reader  # TensorFlow only here

        return tf_reader.as_tf_dataset(self, split, decoders, read_config, shuffle_files)

    def _download_and_prepare(self, dl_manager, download_config=None):  # pytype: disable=signature-mismatch
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        report = getattr(self, "_report", None)
        if report is None:  # max_examples_per_split=0: nothing was generated
            return
        report.write(self.data_path)  # data_path is the build's temporary dir: moved with the data

    def _post_download_and_prepare_hook(self) -> None:
        """After TFDS renamed the temporary directory: print the summary and the report's final path."""
        super()._post_download_and_prepare_hook()
        report = getattr(self, "_report", None)
        if report is None:
            return
        self.report_path = self.data_path / REPORT_FILENAME
        # A report left by an earlier failed build of this version is stale now.
        (self.data_path.parent / FAILED_REPORT_TEMPLATE.format(version=self.version)).unlink(missing_ok=True)
        print("\n" + report.summary() + f"\nbuild report: {self.report_path}", flush=True)
        log.info("build report: %s", self.report_path)


def _read(root: epath.Path, relative: str) -> bytes | None:
    path = root / relative
    try:
        return path.read_bytes()
    except OSError:  # missing, a directory, unreadable: the record has no image
        return None


def build_report(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """The build report of a prepared dataset (what was kept and skipped, by reason)."""
    return read_report(builder.data_path)


__all__ = ["AnchorConfig", "Builder", "NoRecordKept", "build_report"]
