"""ANCHOR: news image–caption pairs with their key subjects (SAFE's training and test data).

The images come from licensed news datasets, so the builder reads a manual directory in any of the
layouts people hold (ours, the authors' split folders, Hugging Face imagefolder, parquet with
embedded images, img2dataset's webdataset shards; README.md, MANUAL_DOWNLOAD_INSTRUCTIONS).
``sample`` and ``synthetic`` need none: they draw the synthetic news world (``world``) themselves,
so demos, tests and pretraining run offline, and every record of theirs carries its
``ground_truth`` (the scene it was drawn from, its subjects with kinds, where each was drawn) as
JSON, so generated pictures can be judged against what the caption really names. Real records
have no such truth: their ``ground_truth`` is "".

A build reads its layout twice, as a stream. The first pass counts what is unusable, finds
duplicate ids and makes sure every split it will announce has at least one image that decodes
(TFDS cannot write a split that ends up empty); the second, one split at a time, decodes and
stores. Neither pass keeps records or images beyond a small batch, so memory stays flat in the
number of records; what the first pass learns is only the few records to leave out. The world's
configs stream too: a record's split is known from its scene spec before it is drawn, so each
split draws only its own records.

Building and reading through ``tfds.data_source`` need no TensorFlow: images are decoded and encoded
with PIL here and records are written as ArrayRecord.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Iterator

import tensorflow_datasets as tfds
from etils import epath

from tfds_anchor.anchor import images, manual, world_records
from tfds_anchor.anchor.layouts import detect, settings
from tfds_anchor.anchor.records import SPLITS, Record
from tfds_anchor.anchor.safe_files import ManualDir, Unreadable
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

    ``layout`` (anchor, folders, imagefolder, parquet, webdataset), ``caption_column``,
    ``image_column`` and ``max_file_mb`` (the largest file or embedded image read, in MiB) override
    the manual directory's ``anchor.toml``; where neither names a layout it is detected.

    The ``synthetic_*`` fields size the world drawn by the ``synthetic`` subset (no manual
    directory): how many records, their pictures' size, the seed every record derives from, and one
    picture in ``synthetic_portrait_every`` turned portrait (0: none).
    """

    subset: str = "non_entity"
    max_side: int = 768
    min_side: int = 64
    jpeg_quality: int = 90
    synthetic_examples: int = 300
    synthetic_size: tuple[int, int] = (128, 128)
    synthetic_seed: int = 0
    synthetic_portrait_every: int = 0
    layout: str | None = None
    caption_column: str | None = None
    image_column: str | None = None
    max_file_mb: float | None = None

    def __post_init__(self):
        if self.subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {self.subset!r}")
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(f"need 0 < min_side <= max_side, got {self.min_side} and {self.max_side}")
        if self.synthetic_examples < 0 or self.synthetic_portrait_every < 0:
            raise ValueError(f"need synthetic_examples >= 0 and synthetic_portrait_every >= 0, got "
                             f"{self.synthetic_examples} and {self.synthetic_portrait_every}")
        settings.check_options(f"AnchorConfig {self.name!r}", layout=self.layout, caption_column=self.caption_column,
                               image_column=self.image_column, max_file_mb=self.max_file_mb)


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for ANCHOR (and the offline synthetic world: ``sample``, ``synthetic``)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: default (non-entity), entity and sample configs.",
        "1.1.0": "sample is now 300 pairs of the synthetic news world (128x128, splits by held-out "
                 "combination) with their ground truth; new synthetic config (20,000 world pairs); new "
                 "ground_truth feature (the world's JSON truth, \"\" for real ANCHOR records).",
    }
    BUILDER_CONFIGS = [
        AnchorConfig(name="default", subset="non_entity",
                     description="ANCHOR's non-entity subset, from a manual directory."),
        AnchorConfig(name="entity", subset="entity",
                     description="ANCHOR Entity: pairs whose image shows a named person (field `entity`)."),
        AnchorConfig(name="sample", subset="synthetic", synthetic_examples=300, synthetic_size=(128, 128),
                     synthetic_seed=0, synthetic_portrait_every=0,
                     description="300 pairs of the synthetic news world (128x128) with their ground truth, drawn "
                                 "offline, for demos and tests."),
        AnchorConfig(name="synthetic", subset="synthetic", synthetic_examples=20_000, synthetic_size=(128, 128),
                     synthetic_seed=0, synthetic_portrait_every=0,
                     description="20,000 pairs of the synthetic news world (128x128) with their ground truth, "
                                 "drawn offline, for pretraining and larger experiments."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    ANCHOR's captions and metadata are released on Zenodo (record 10974908,
    https://zenodo.org/records/10974908); its images come from licensed news datasets
    (VisualNews: The Guardian, BBC, USA Today, The Washington Post; GoodNews / NYTimes800k:
    The New York Times), which you obtain from their owners under their terms.

    The manual directory (`--manual_dir`, default ~/tensorflow_datasets/downloads/manual/) may hold
    any of these layouts; the builder finds which (or name it: `layout = "..."` in anchor.toml):

      anchor       anchor.jsonl (or anchor.csv), one record a line:
                     {"id": "...", "caption": "...", "source": "The Guardian",
                      "image": "images/000123.jpg",            # relative to the manual directory
                      "subjects": ["Boris Johnson", "Tower Bridge"],  # optional
                      "entity": "Boris Johnson",               # optional: marks ANCHOR Entity records
                      "split": "train"}                        # optional: train / validation / test
      folders      train/, val/ (or validation/), test/ of <id>.jpg + <id>.txt (the caption); the source
                   from the id ("595103guardian"); folders named entity / non_entity give the subset
      imagefolder  metadata.jsonl or metadata.csv (root or per split folder): file_name + text or caption
      parquet      *.parquet with image bytes (datasets' `image` struct, or a binary `jpg` column) and a
                   caption column, as datasets or img2dataset (--output_format parquet) write them
      webdataset   *.tar shards of <key>.jpg + <key>.txt + <key>.json, as img2dataset writes them

      anchor.toml    optional: layout, caption_column, image_column, max_file_mb (default 64)
      subjects.jsonl optional: {"id": "...", "subjects": [...]} a line, for records without
                     `subjects`; write it before the build with
                       safe-jax subjects --manual-dir <manual directory>

    Extra fields are ignored. The build computes no subjects: a record with none is stored with an
    empty list (the input pipeline can fill it). Records without a split are split by a hash of
    their id (90/5/5). Bad records, and files that are never read (FIFOs, devices, symlinks leading
    out of the directory, files over max_file_mb), are skipped and counted in build_report.json next
    to the built dataset; a build that keeps no record at all fails, naming the reasons.
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
                # JSON for the synthetic world's records (see world_records), "" for real ones.
                "ground_truth": tfds.features.Text(),
            }),
            supervised_keys=None,
            homepage=_HOMEPAGE,
        )

    # ------------------------------------------------------------------ generation
    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        config: AnchorConfig = self.builder_config
        self._report = report = BuildReport(config=config.name)
        if config.subset == "synthetic":
            return self._synthetic_splits(report)
        root = epath.Path(dl_manager.manual_dir)
        # Every mistake of the user's (a layout, a column, anchor.toml) is raised here, before any record is read.
        chosen = settings.resolve(root, layout=config.layout, caption_column=config.caption_column,
                                  image_column=config.image_column, max_file_mb=config.max_file_mb)
        dirs = ManualDir(root, chosen.max_file_bytes)
        layout = detect.open_layout(chosen, dirs)
        layout.check()
        report.layout = chosen.layout
        log.info("anchor/%s: reading %s as layout %r (%s)", config.name, root, chosen.layout, chosen.origin)
        splits, left_out = self._scan(layout, dirs, report)
        if not splits:
            self._fail_nothing_kept(report, root)
        subjects = manual.read_subjects(dirs, report)
        return {split: self._generate_examples(layout, dirs, split, left_out, subjects)
                for split in SPLITS if split in splits}

    def _synthetic_splits(self, report: BuildReport) -> dict[str, Iterator]:
        """The world, one split at a time: the splits are counted from the specs (cheap), and each
        split's generator draws its own records only, so no split's pictures wait in memory."""
        config: AnchorConfig = self.builder_config
        n, seed = config.synthetic_examples, config.synthetic_seed
        counts = world_records.split_counts(n, seed)
        report.records_read = sum(counts.values())
        if not counts:
            self._fail_nothing_kept(report, None)
        self._warn_missing_splits(set(counts), report)
        return {split: self._write(world_records.pairs(n, seed, config.synthetic_size, config.jpeg_quality,
                                                       config.synthetic_portrait_every, split=split), None, {})
                for split in SPLITS if split in counts}

    def _scan(self, layout: Any, dirs: ManualDir, report: BuildReport) -> tuple[set[str], set[str]]:
        """The first pass: (the splits to write, the origins of records already skipped and counted).

        Counts every record's reading problems and duplicate ids, and checks images only until each
        split has one that decodes; the second pass judges the rest as it stores them.
        """
        config: AnchorConfig = self.builder_config
        wanted = config.subset == "entity"
        seen: set[int] = set()        # 8-byte digests of the ids read: the only per-record memory of a build
        left_out: set[str] = set()
        verified: set[str] = set()
        others = 0
        for record in layout.records(report):
            digest = int.from_bytes(hashlib.blake2b(record.id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "big")
            if digest in seen:
                report.skip("duplicate_id", record.id)
                left_out.add(record.origin)
                continue
            seen.add(digest)
            if record.is_entity() != wanted:
                others += 1
                continue
            if record.split in verified:
                continue
            reason = self._verdict(record, dirs)
            if reason is None:
                verified.add(record.split)
            else:
                report.skip(reason, record.id)
                left_out.add(record.origin)
        if dirs.unfollowed:
            report.note("symlinked folders leading out of the manual directory (not read)", len(dirs.unfollowed))
        if others:
            report.note(f"records of the other subset ({'non-entity' if wanted else 'entity'}), not in this config",
                        others)
        self._warn_missing_splits(verified, report)
        return verified, left_out

    def _verdict(self, record: Record, dirs: ManualDir) -> str | None:
        """Why a record's image cannot be stored, or None: a full decode, without the JPEG encode."""
        data = _image_bytes(record, dirs)
        if isinstance(data, str):
            return data
        try:
            images.check(data, min_side=self.builder_config.min_side)
        except images.BadImage as e:
            return e.reason
        return None

    def _warn_missing_splits(self, splits: set[str], report: BuildReport) -> None:
        # A split with no record while others have some is a warning, not an error: manual data may
        # carry only the splits it has (its own `split` field), and hash-splitting a small directory
        # can leave validation or test empty. TFDS then has no such split, and reading it fails at
        # once with TFDS's "Unknown split" error naming the splits there are. (Zero records in every
        # split is the error NoRecordKept: TFDS would mark such a dataset prepared and fail much later.)
        if not splits:
            return
        for split in SPLITS:
            if split not in splits:
                report.note(f"split {split!r} has no record and is not in the dataset")
                log.warning("anchor/%s: no record in split %r; the dataset has only %s", self.builder_config.name,
                            split, ", ".join(s for s in SPLITS if s in splits))

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

    def _generate_examples(self, layout: Any, dirs: ManualDir, split: str, left_out: set[str],
                           subjects: dict[str, list[str]]):
        """The second pass, for one split: the layout read again, as the first pass read it."""
        wanted = self.builder_config.subset == "entity"
        # Reading problems were counted by the first pass; this pass's own count is thrown away.
        records = (r for r in layout.records(BuildReport(), split=split)
                   if r.split == split and r.origin not in left_out and r.is_entity() == wanted)
        yield from self._write(records, dirs, subjects)

    def _write(self, records: Iterator[Record], dirs: ManualDir | None, subjects: dict[str, list[str]]):
        config: AnchorConfig = self.builder_config
        report = self._report

        def prepared(record: Record) -> tuple[Record, images.Prepared | str]:
            data = _image_bytes(record, dirs)
            if isinstance(data, str):
                return record, data
            try:
                return record, images.prepare(data, max_side=config.max_side, min_side=config.min_side,
                                              quality=config.jpeg_quality)
            except images.BadImage as e:
                return record, e.reason

        for record, image in images.parallel_map(prepared, records):
            if isinstance(image, str):
                report.skip(image, record.id)
                continue
            if image.converted_from:
                report.converted[image.converted_from] += 1
            if image.reencoded and config.subset != "synthetic":
                report.note("images re-encoded (converted, rotated or larger than max_side)")
            record_subjects = record.subjects
            if record_subjects is None and record.id in subjects:
                record_subjects = subjects[record.id]
                report.note(f"records with subjects from {manual.SUBJECTS_NAME}")
            if record_subjects is None:
                report.note(f"records without subjects, stored with an empty list (none given, and none in "
                            f"{manual.SUBJECTS_NAME})")
            report.kept[record.split] += 1
            yield record.id, {
                "image": image.jpeg,
                "image_id": record.id,
                "caption": record.caption,
                "source": normalise_source(record.source),
                "subjects": record_subjects or [],
                "entity": record.entity if config.subset == "entity" else "",
                "ground_truth": getattr(record, "ground_truth", ""),
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


def _image_bytes(record: Record, dirs: ManualDir | None) -> bytes | str:
    """A record's image, or the reason it is not read (a FIFO, a device, a link out, too large, absent)."""
    if record.image_bytes is not None:
        return record.image_bytes
    if dirs is None or record.image is None:
        return "missing_image"
    try:
        return dirs.read(record.image)
    except Unreadable as e:
        return e.reason


def build_report(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """The build report of a prepared dataset (what was kept and skipped, by reason)."""
    return read_report(builder.data_path)


__all__ = ["AnchorConfig", "Builder", "NoRecordKept", "build_report"]
