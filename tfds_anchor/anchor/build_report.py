"""What a build kept and skipped, by reason: written next to the dataset and printed at the end.

A build never stops on a bad record and never drops a good one silently; this report is how a user
learns which records were left out and why (with a few example ids per reason to look at).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

from etils import epath

REPORT_FILENAME = "build_report.json"
# Where a build that kept nothing leaves its report: beside the version directories (a name TFDS
# does not take for a version), since the temporary build directory is deleted on failure.
FAILED_REPORT_TEMPLATE = "build_report-{version}-failed.json"

# Reasons a record is skipped. Everything else about a record is repaired (and noted), not skipped.
SKIP_REASONS = {
    "malformed_line": "the line is not a JSON object (or the CSV row is unreadable)",
    "missing_id": "no id",
    "duplicate_id": "an earlier record has the same id (the first is kept)",
    "empty_caption": "the caption is missing or only whitespace",
    "non_utf8_caption": "the caption is not valid UTF-8",
    "missing_image": "no image path, or no file at it",
    "unsafe_image_path": "the image path leaves the manual directory",
    "truncated_image": "the image file ends early",
    "corrupt_image": "the image cannot be decoded",
    "too_large_image": "the image has more pixels than PIL allows (a decompression bomb?)",
    "tiny_image": "the image's shorter side is below the config's min_side",
    # Files that are never read (safe_files.py), and damaged containers.
    "special_file": "a FIFO, device or socket (or a link entry in a tar shard) where a file should be: never read",
    "not_a_file": "a directory where a file should be",
    "link_outside": "a symlink that resolves outside the manual directory (never followed)",
    "oversize_file": "the file or embedded image is larger than max_file_mb (never read)",
    "unreadable_file": "the file cannot be opened or read (permissions, I/O error, not a valid container)",
    "truncated_member": "the tar shard ends inside this sample (the rest of the shard is lost)",
    "unreadable_rows": "the parquet row group holding the row cannot be read (counted per row)",
    "not_downloaded": "img2dataset's status for the sample is not success",
}
_EXAMPLES_PER_REASON = 5


class NoRecordKept(ValueError):
    """A build in which every record was skipped: there is nothing to write, so the build fails.

    The message is one line naming the reasons (counts from the build report) and the report's path.
    """


@dataclasses.dataclass
class BuildReport:
    config: str = ""
    layout: str = ""  # the manual directory's layout ("" for sample)
    records_read: int = 0
    kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)        # by split
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)     # by reason
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)                  # reason → ids
    converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)   # image mode → n
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)       # repairs, info

    def skip(self, reason: str, record_id: Any = None, n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped[reason] += n
        ids = self.examples.setdefault(reason, [])
        if record_id is not None and len(ids) < _EXAMPLES_PER_REASON:
            ids.append(str(record_id))

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] += n

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "layout": self.layout,
            "records_read": self.records_read,
            "kept": dict(sorted(self.kept.items())),
            "kept_total": sum(self.kept.values()),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "skipped_examples": {k: v for k, v in sorted(self.examples.items()) if v},
            "converted_to_rgb": dict(sorted(self.converted.items())),
            "notes": dict(sorted(self.notes.items())),
            "reasons": {k: SKIP_REASONS[k] for k in sorted(self.skipped)},
        }

    def why_nothing_kept(self) -> str:
        """The reasons no record was kept, most frequent first, for a one-line error."""
        reasons = [f"{n} {'record was' if n == 1 else 'records were'} skipped for {reason} ({SKIP_REASONS[reason]})"
                   for reason, n in self.skipped.most_common()]
        reasons += [f"{n} {what}" for what, n in self.notes.most_common() if what.startswith("records of the other")]
        if not self.records_read:
            reasons.insert(0, "no record was read")
        return "; ".join(reasons) or f"{self.records_read} records read, none kept"

    def write(self, directory: epath.PathLike, filename: str = REPORT_FILENAME) -> epath.Path:
        path = epath.Path(directory) / filename
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        return path

    def summary(self) -> str:
        kept = ", ".join(f"{k} {v}" for k, v in sorted(self.kept.items())) or "none"
        layout = f", from the {self.layout} layout" if self.layout else ""
        lines = [f"anchor/{self.config}: read {self.records_read} records, kept {sum(self.kept.values())} ({kept}), "
                 f"skipped {sum(self.skipped.values())}{layout}"]
        for reason, n in sorted(self.skipped.items()):
            ids = ", ".join(self.examples.get(reason, []))
            lines.append(f"  skipped {n:>6}  {reason}: {SKIP_REASONS[reason]}" + (f" (e.g. {ids})" if ids else ""))
        for mode, n in sorted(self.converted.items()):
            lines.append(f"  converted {n:>4}  {mode} → RGB")
        for what, n in sorted(self.notes.items()):
            lines.append(f"  note {n:>9}  {what}")
        return "\n".join(lines)


def read_report(directory: epath.PathLike) -> dict[str, Any]:
    """The report of a built dataset (``builder.data_dir``)."""
    return json.loads((epath.Path(directory) / REPORT_FILENAME).read_text())
