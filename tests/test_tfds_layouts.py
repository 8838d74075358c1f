"""The ANCHOR builder over every manual-directory layout (ours, the authors' folders, imagefolder,
parquet, webdataset), the same records giving the same examples in each; hostile files (FIFOs,
devices, sockets, symlinks out, oversize files, truncated tars, damaged parquet) skipped and
counted without hanging the build; and every bad setting one clear line before the build."""

from __future__ import annotations

import csv
import faulthandler
import io
import json
import os
import socket
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from tfds_anchor.anchor import manual  # noqa: E402
from tfds_anchor.anchor.anchor_dataset_builder import AnchorConfig, Builder  # noqa: E402
from tfds_anchor.anchor.build_report import BuildReport, read_report  # noqa: E402
from tfds_anchor.anchor.layouts.parquet import ParquetFiles  # noqa: E402
from tfds_anchor.anchor.layouts.settings import LayoutError, Settings  # noqa: E402
from tfds_anchor.anchor.layouts.webdataset import TarShards  # noqa: E402
from tfds_anchor.anchor.safe_files import ManualDir, Unreadable  # noqa: E402

LAYOUTS = ("anchor", "folders", "imagefolder", "parquet", "webdataset")
SUFFIXES = ("guardian", "bbc", "usa_today", "washington_post", "nytimes", "reuters")
SOURCE_OF = {"guardian": "the_guardian", "bbc": "bbc", "usa_today": "usa_today",
             "washington_post": "washington_post", "nytimes": "new_york_times", "reuters": "other"}
SPLIT_FOLDER = {"train": "train", "validation": "val", "test": "test"}
CAPTIONS = ("Firefighters tackle a blaze near {p} in {c}.", "Crowds gather outside {p} in {c} before the vote.",
            "The mayor of {c} speaks to reporters at {p}.")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def no_hang():
    """A build that hangs (a FIFO opened for reading) would stall the test run: end it with a traceback."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _jpeg(seed: int, w: int = 80, h: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.uniform(0.3, 1.0, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _records(n: int = 14, start: int = 0) -> list[dict]:
    """Authors-style records: ids naming their source, splits 10/2/2, subjects spans of the caption."""
    out = []
    for i in range(start, start + n):
        place, city = ("Tower Bridge", "the town hall", "City Hall")[i % 3], ("London", "Leeds", "Houston")[i % 3]
        k = i - start
        out.append({
            "id": f"{61772 + i}{SUFFIXES[i % len(SUFFIXES)]}",
            "caption": CAPTIONS[i % 3].format(p=place, c=city),
            "split": "train" if k < n - 4 else "validation" if k < n - 2 else "test",
            "subjects": [place, city],
            "image": _jpeg(i),
        })
    return out


# ---------------------------------------------------------------------------------- writers
def write_anchor(root: Path, records: list[dict]) -> None:
    (root / "images").mkdir(parents=True)
    lines = []
    for r in records:
        (root / "images" / f"{r['id']}.jpg").write_bytes(r["image"])
        lines.append(json.dumps({"id": r["id"], "caption": r["caption"], "image": f"images/{r['id']}.jpg",
                                 "split": r["split"], "subjects": r["subjects"]}))
    (root / "anchor.jsonl").write_text("\n".join(lines) + "\n")


def write_folders(root: Path, records: list[dict], subset: str = "") -> None:
    for r in records:
        folder = root / subset / SPLIT_FOLDER[r["split"]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{r['id']}.jpg").write_bytes(r["image"])
        (folder / f"{r['id']}.txt").write_text(r["caption"] + "\n")
    with open(root / "subjects.jsonl", "a") as f:
        f.writelines(json.dumps({"id": r["id"], "subjects": r["subjects"]}) + "\n" for r in records)


def write_imagefolder(root: Path, records: list[dict]) -> None:
    by_split: dict[str, list[dict]] = {}
    for r in records:
        by_split.setdefault(r["split"], []).append(r)
    for split, rows in by_split.items():
        folder = root / split
        (folder / "img").mkdir(parents=True)
        for r in rows:
            (folder / "img" / f"{r['id']}.jpg").write_bytes(r["image"])
        if split == "validation":  # one split as CSV, subjects `;`-separated
            with open(folder / "metadata.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file_name", "text", "subjects", "width"])
                writer.writerows([f"img/{r['id']}.jpg", r["caption"], "; ".join(r["subjects"]), 80] for r in rows)
        else:
            (folder / "metadata.jsonl").write_text("".join(
                json.dumps({"file_name": f"img/{r['id']}.jpg", "text": r["caption"], "subjects": r["subjects"],
                            "photographer": "unknown"}) + "\n" for r in rows))


def _parquet_table(rows: list[dict]) -> "pa.Table":
    return pa.table({
        "image": pa.array([{"bytes": r["image"], "path": f"{r['id']}.jpg"} for r in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "text": [r["caption"] for r in rows],
        "subjects": pa.array([r["subjects"] for r in rows], pa.list_(pa.string())),
    })


def write_parquet(root: Path, records: list[dict]) -> None:
    (root / "data").mkdir(parents=True)
    by_split: dict[str, list[dict]] = {}
    for r in records:
        by_split.setdefault(r["split"], []).append(r)
    for split, rows in by_split.items():
        parts = [rows[: len(rows) // 2], rows[len(rows) // 2:]] if split == "train" else [rows]  # many files
        for k, part in enumerate(parts):
            pq.write_table(_parquet_table(part), root / "data" / f"{split}-{k:05d}-of-{len(parts):05d}.parquet",
                           row_group_size=3)


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path, records: list[dict]) -> None:
    by_split: dict[str, list[dict]] = {}
    for r in records:
        by_split.setdefault(r["split"], []).append(r)
    for split, rows in by_split.items():
        (root / split).mkdir(parents=True)
        with tarfile.open(root / split / "00000.tar", "w") as tar:
            for r in rows:  # webdataset's order: sorted extensions
                _tar_member(tar, f"{r['id']}.jpg", r["image"])
                _tar_member(tar, f"{r['id']}.json", json.dumps({"status": "success", "subjects": r["subjects"],
                                                                "url": "https://example.org/x.jpg"}).encode())
                _tar_member(tar, f"{r['id']}.txt", r["caption"].encode())
        (root / split / "00000.parquet").write_bytes(b"img2dataset's metadata sidecar: never read")
        (root / split / "00000_stats.json").write_text("{}")


WRITERS = {"anchor": write_anchor, "folders": write_folders, "imagefolder": write_imagefolder,
           "parquet": write_parquet, "webdataset": write_webdataset}


# ---------------------------------------------------------------------------------- building
def build(manual_dir: Path, data_dir: Path, name: str = "t", **config) -> Builder:
    config = AnchorConfig(name=name, subset=config.pop("subset", "non_entity"), min_side=32, **config)
    builder = Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def examples(builder: Builder) -> dict[str, dict]:
    names = builder.info.features["source"].names
    out = {}
    for split in builder.info.splits:
        for ex in builder.as_data_source(split=split):
            out[ex["image_id"].decode()] = {
                "split": split, "caption": ex["caption"].decode(), "source": names[ex["source"]],
                "subjects": [s.decode() for s in ex["subjects"]], "entity": ex["entity"].decode(),
                "ground_truth": ex["ground_truth"].decode(), "image": ex["image"].tobytes(),
            }
    return out


def test_every_layout_builds_the_same_examples(tmp_path):
    records = _records(14)
    built = {}
    for layout in LAYOUTS:
        root = tmp_path / layout
        WRITERS[layout](root, records)
        builder = build(root, tmp_path / "data", name=f"t_{layout}")
        report = read_report(builder.data_path)
        assert report["layout"] == layout  # detected
        assert report["skipped"] == {}, (layout, report["skipped"])
        assert report["kept"] == {"train": 10, "validation": 2, "test": 2}, layout
        assert report["notes"]["ids naming an unknown source 'reuters' (stored as other)"] == 2, layout
        built[layout] = examples(builder)
    expected = {r["id"]: {"split": r["split"], "caption": r["caption"], "subjects": r["subjects"],
                          "source": SOURCE_OF[r["id"].lstrip("0123456789")]} for r in records}
    for layout, got in built.items():
        fields = {i: {k: e[k] for k in ("split", "caption", "subjects", "source")} for i, e in got.items()}
        assert fields == expected, layout
        assert all(e["ground_truth"] == "" for e in got.values()), layout  # real records carry no truth
        assert got == built["anchor"], f"{layout} differs from the anchor layout"
    image = np.asarray(Image.open(io.BytesIO(records[0]["image"])))
    assert built["parquet"][records[0]["id"]]["image"] == image.tobytes()  # stored as given (pass-through)


def test_folders_entity_subset_from_folder_names_and_explicit_layout(tmp_path):
    root = tmp_path / "manual"
    entity, other = _records(6, start=0), _records(8, start=100)
    write_folders(root, entity, subset="ANCHOR_Entity")
    write_folders(root, other, subset="anchor_non_entity")
    (root / "anchor.toml").write_text('layout = "folders"\nmax_file_mb = 8\n')
    got = examples(build(root, tmp_path / "data", name="e", subset="entity"))
    assert set(got) == {r["id"] for r in entity}
    builder = build(root, tmp_path / "data", name="n")
    assert set(examples(builder)) == {r["id"] for r in other}
    report = read_report(builder.data_path)
    assert report["notes"]["records of the other subset (entity), not in this config"] == 6
    assert report["notes"]["records with subjects from subjects.jsonl"] == 8


def test_img2dataset_parquet_status_and_split_by_hash(tmp_path):
    """img2dataset's parquet output: `key`, `jpg`, `txt`, `status`; failed rows have no image."""
    root = tmp_path / "manual"
    root.mkdir()
    records = _records(12)
    statuses = ["success"] * 10 + ["failed_to_download"] * 2
    pq.write_table(pa.table({
        "key": [f"{i:09d}" for i in range(12)],
        "jpg": pa.array([r["image"] if s == "success" else None for r, s in zip(records, statuses)], pa.binary()),
        "txt": [r["caption"] for r in records],
        "url": ["https://example.org/x.jpg"] * 12,
        "status": statuses,
    }), root / "00000.parquet", row_group_size=5)
    builder = build(root, tmp_path / "data")
    report = read_report(builder.data_path)
    assert report["skipped"] == {"not_downloaded": 2} and report["kept_total"] == 10
    got = examples(builder)
    assert set(got) == {f"{i:09d}" for i in range(10)}
    assert {e["source"] for e in got.values()} == {"other"}
    assert all(e["split"] == manual.hash_split(i) for i, e in got.items())


# ---------------------------------------------------------------------------------- hostile files
def _mkfifo(path: Path) -> None:
    os.mkfifo(path)


def _hostile_folder(root: Path, outside: Path, monkeypatch) -> tuple[set[str], dict[str, int]]:
    """A folders-layout directory of good records plus one planted file of each hostile kind."""
    good = _records(10)
    write_folders(root, good)
    train = root / "train"
    outside.write_bytes(_jpeg(99))
    hostile = {
        "1fifoguardian": lambda p: _mkfifo(p),                          # a FIFO named like an image
        "2zerobbc": lambda p: p.symlink_to("/dev/zero"),               # a device, through a symlink
        "3outsidebbc": lambda p: p.symlink_to(outside),                # an image outside the directory
        "4bigbbc": lambda p: p.write_bytes(b"\xff\xd8" + os.urandom(80_000)),  # over max_file_mb
        "5dirbbc": lambda p: p.mkdir(),                                # a directory named like an image
    }
    for rid, plant in hostile.items():
        plant(train / f"{rid}.jpg")
        (train / f"{rid}.txt").write_text("A planted file that must never be read.")
    monkeypatch.chdir(train)  # a socket's path must be short: bind it relative to its folder
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("6sockbbc.jpg")
    (train / "6sockbbc.txt").write_text("A socket named like an image.")
    (train / "7capbbc.jpg").write_bytes(_jpeg(7))
    _mkfifo(train / "7capbbc.txt")                                     # a FIFO as the caption
    (root / "test").mkdir(exist_ok=True)
    (root / "test" / "8linkbbc.jpg").symlink_to(train / f"{good[0]['id']}.jpg")  # a link inside: followed
    (root / "test" / "8linkbbc.txt").write_text("A symlink to an image inside the directory.")
    kept = {r["id"] for r in good} | {"8linkbbc"}
    skips = {"special_file": 3, "link_outside": 2, "oversize_file": 1, "not_a_file": 1}
    return kept, skips


def test_hostile_files_in_folders_and_anchor_layouts(tmp_path, monkeypatch, no_hang):
    root = tmp_path / "manual"
    kept, skips = _hostile_folder(root, tmp_path / "outside.jpg", monkeypatch)
    (root / "anchor.toml").write_text("max_file_mb = 0.05\n")  # 52 KB: 4bigbbc.jpg is larger
    start = time.monotonic()
    builder = build(root, tmp_path / "data", name="folders")
    report = read_report(builder.data_path)
    assert report["layout"] == "folders"
    assert report["skipped"] == skips
    assert set(examples(builder)) == kept
    assert report["skipped_examples"]["link_outside"] == ["2zerobbc", "3outsidebbc"]

    # The same files listed in anchor.jsonl (ours): the same verdicts, and a FIFO as anchor.jsonl's image.
    lines = []
    for folder in ("train", "val", "test"):
        for p in sorted((root / folder).iterdir()):
            if p.suffix == ".jpg" and p.stem != "7capbbc":
                lines.append(json.dumps({"id": p.stem, "caption": "A caption.", "image": f"{folder}/{p.name}"}))
    (root / "anchor.jsonl").write_text("\n".join(lines) + "\n")
    builder = build(root, tmp_path / "data", name="ours")
    report = read_report(builder.data_path)
    assert report["layout"] == "anchor"
    assert report["skipped"] == {**skips, "special_file": 2}  # no caption file here
    assert set(examples(builder)) == kept
    assert time.monotonic() - start < 60


def test_hostile_webdataset_shards(tmp_path, no_hang):
    root = tmp_path / "manual"
    good = _records(10)
    write_webdataset(root, good)
    extra = _records(3, start=50)
    with tarfile.open(root / "train" / "00001.tar", "w") as tar:
        _tar_member(tar, f"{extra[0]['id']}.jpg", b"\xff\xd8" + os.urandom(80_000))  # over max_file_mb
        _tar_member(tar, f"{extra[0]['id']}.txt", b"An oversize member.")
        link = tarfile.TarInfo(f"{extra[1]['id']}.jpg")                          # a symlink member
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _tar_member(tar, f"{extra[1]['id']}.txt", b"A link member.")
        _tar_member(tar, f"{extra[2]['id']}.json", json.dumps({"status": "failed_to_download"}).encode())
    # A shard cut inside its second sample's image: the first sample is kept, the second counted.
    cut = _records(3, start=60)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for r in cut:
            _tar_member(tar, f"{r['id']}.jpg", r["image"])
            _tar_member(tar, f"{r['id']}.txt", r["caption"].encode())
    whole = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        second = tar.getmember(f"{cut[1]['id']}.jpg").offset_data
    (root / "train" / "00002.tar").write_bytes(whole[: second + 100])
    os.mkfifo(root / "train" / "00003.tar")                     # a FIFO shard
    (root / "train" / "00004.tar").symlink_to("/dev/zero")      # a device shard
    (root / "train" / "00005.tar").write_bytes(os.urandom(3000))  # not a tar at all
    (root / "anchor.toml").write_text('layout = "webdataset"\nmax_file_mb = 0.05\n')
    start = time.monotonic()
    builder = build(root, tmp_path / "data")
    report = read_report(builder.data_path)
    assert report["skipped"] == {"oversize_file": 1, "special_file": 2, "not_downloaded": 1, "truncated_member": 1,
                                 "link_outside": 1, "unreadable_file": 1}, report["skipped"]
    assert report["skipped_examples"]["truncated_member"] == [cut[1]["id"]]
    assert set(examples(builder)) == {r["id"] for r in good} | {cut[0]["id"]}
    assert time.monotonic() - start < 60


def test_hostile_parquet_files(tmp_path, no_hang):
    root = tmp_path / "manual"
    root.mkdir()
    records = _records(12)
    rows = records[:]
    big = {**_records(1, start=70)[0], "image": os.urandom(80_000)}
    none = {**_records(1, start=71)[0], "image": None}
    table = _parquet_table(rows[:3] + rows[3:6] + rows[6:9] + [big, none] + rows[9:])
    path = root / "train-00000.parquet"
    pq.write_table(table, path, row_group_size=3)
    # Damage the second row group's image pages: its 3 rows are lost and counted, the others kept.
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    raw[column.data_page_offset: column.data_page_offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(raw))
    os.mkfifo(root / "fifo.parquet")
    (root / "junk.parquet").write_bytes(b"PAR1" + os.urandom(500))
    (root / "anchor.toml").write_text("max_file_mb = 0.05\n")
    start = time.monotonic()
    builder = build(root, tmp_path / "data")
    report = read_report(builder.data_path)
    assert report["layout"] == "parquet"
    assert report["skipped"] == {"unreadable_rows": 3, "oversize_file": 1, "missing_image": 1, "special_file": 1,
                                 "unreadable_file": 1}, report["skipped"]
    assert report["skipped_examples"]["unreadable_rows"] == ["train-00000.parquet#row-group-1"]
    assert set(examples(builder)) == {r["id"] for r in rows[:3] + rows[6:]}
    assert time.monotonic() - start < 60


def test_hostile_imagefolder_paths(tmp_path, no_hang):
    root = tmp_path / "manual"
    records = _records(10)
    write_imagefolder(root, records)
    (tmp_path / "secret.jpg").write_bytes(_jpeg(5))
    os.mkfifo(root / "train" / "img" / "fifo.jpg")
    with open(root / "train" / "metadata.jsonl", "a") as f:
        for name in ("../../secret.jpg", "/etc/passwd", "img/fifo.jpg"):
            f.write(json.dumps({"file_name": name, "text": "A planted path."}) + "\n")
    os.mkdir(root / "more")
    os.mkfifo(root / "more" / "metadata.csv")  # a FIFO as a metadata file
    builder = build(root, tmp_path / "data")
    report = read_report(builder.data_path)
    assert report["skipped"] == {"unsafe_image_path": 2, "special_file": 2}
    assert set(examples(builder)) == {r["id"] for r in records}


def test_manual_dir_reads_only_regular_files_inside(tmp_path):
    dev = ManualDir("/dev")
    for name in ("zero", "null"):
        with pytest.raises(Unreadable) as e:
            dev.read(name)
        assert e.value.reason == "special_file"
    (tmp_path / "a.jpg").write_bytes(b"x" * 100)
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "out.jpg").symlink_to("/etc/hostname")
    (tmp_path / "in.jpg").symlink_to(tmp_path / "a.jpg")
    dirs = ManualDir(tmp_path, max_file_bytes=99)
    for name, reason in (("a.jpg", "oversize_file"), ("fifo.jpg", "special_file"), ("out.jpg", "link_outside"),
                         ("nowhere.jpg", "missing_image"), ("../a.jpg", "unsafe_image_path"),
                         ("/etc/hostname", "unsafe_image_path"), ("a\0.jpg", "unsafe_image_path")):
        with pytest.raises(Unreadable) as e:
            dirs.read(name)
        assert e.value.reason == reason, name
    assert ManualDir(tmp_path).read("in.jpg") == b"x" * 100


def test_container_layouts_stream_in_flat_memory(tmp_path):
    """Reading parquet and tar shards holds a batch or a sample, not the data: the peak of Python
    memory while reading 240 images of 20 KB (4.8 MB) stays under a third of it."""
    root = tmp_path / "manual"
    (root / "p").mkdir(parents=True)
    (root / "w").mkdir()
    payload = [os.urandom(20_000) for _ in range(240)]
    rows = [{"id": f"{i}bbc", "caption": "A caption.", "image": b, "split": "train", "subjects": []}
            for i, b in enumerate(payload)]
    pq.write_table(_parquet_table(rows), root / "p" / "a.parquet", row_group_size=40)
    with tarfile.open(root / "w" / "a.tar", "w") as tar:
        for r in rows:
            _tar_member(tar, f"{r['id']}.jpg", r["image"])
            _tar_member(tar, f"{r['id']}.txt", b"A caption.")
    del payload, rows
    dirs = ManualDir(root)
    for reader in (ParquetFiles(dirs, Settings("parquet")), TarShards(dirs, Settings("webdataset"))):
        tracemalloc.start()
        n = sum(len(r.image_bytes) for r in reader.records(BuildReport()))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert n == 240 * 20_000
        assert peak < n / 3, (type(reader).__name__, peak)


# ---------------------------------------------------------------------------------- bad settings
def _one_line_error(root: Path, data_dir: Path, match: str, **config) -> str:
    with pytest.raises(LayoutError, match=match) as e:
        build(root, data_dir, **config)
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, ValueError)
    return message


def test_bad_settings_are_one_line_before_the_build(tmp_path):
    with pytest.raises(ValueError, match="layout 'zip' is not one of anchor, folders, imagefolder"):
        AnchorConfig(name="x", layout="zip")
    with pytest.raises(ValueError, match="max_file_mb must be a number > 0"):
        AnchorConfig(name="x", max_file_mb=0)
    root = tmp_path / "manual"
    write_folders(root, _records(4))
    data = tmp_path / "data"
    toml = root / "anchor.toml"
    for text, match in (('layout = "zip"\n', r"anchor.toml: layout 'zip' is not one of"),
                        ('layout = folders\n', r"anchor.toml: not valid TOML: "),
                        ('layot = "folders"\n', r"anchor.toml: unknown key 'layot' \(the keys are layout, "),
                        ("max_file_mb = -1\n", r"anchor.toml: max_file_mb must be a number > 0"),
                        ('layout = "parquet"\n', r"layout 'parquet': no \*.parquet file under "),
                        ('caption_column = "text"\n',
                         r"caption_column does not apply to layout 'folders' \(detected\)")):
        toml.write_text(text)
        _one_line_error(root, data, match)
    toml.unlink()
    os.mkfifo(toml)
    _one_line_error(root, data, r"anchor.toml: cannot be read \(special file\)")
    toml.unlink()
    _one_line_error(root, data, "image_column applies to the parquet layout only", image_column="jpg")

    pq_root = tmp_path / "pq"
    write_parquet(pq_root, _records(4))
    _one_line_error(pq_root, data, r"-00000-of-0000\d.parquet: no caption column 'caption_en' \(columns: image, "
                                   r"text, subjects\); name it with caption_column", caption_column="caption_en")
    _one_line_error(pq_root, data, r"no image column 'text'|column 'text' holds string, not image bytes",
                    image_column="text")
    hf_root = tmp_path / "hf"
    (hf_root / "train").mkdir(parents=True)
    (hf_root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "label": 3}) + "\n")
    _one_line_error(hf_root, data, r"metadata.jsonl: no caption column text or caption \(columns: file_name, label\)")
    assert not any(data.glob("**/*.array_record*"))  # nothing was written


def test_empty_directory_names_every_layout(tmp_path):
    root = tmp_path / "manual"
    root.mkdir()
    (root / "notes.txt").write_text("images are coming")
    with pytest.raises(FileNotFoundError) as e:
        build(root, tmp_path / "data")
    message = str(e.value)
    assert "\n" not in message
    for what in ("anchor.jsonl", "metadata.jsonl", "*.tar", "*.parquet", "<id>.txt"):
        assert what in message


@pytest.mark.slow
def test_tfds_build_command_line_with_a_layout_config(tmp_path):
    """`tfds build --config '{json}'` names a layout (the other way is anchor.toml)."""
    import subprocess
    import sys

    pytest.importorskip("apache_beam")
    pytest.importorskip("mlcroissant")
    root_repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "manual"
    write_webdataset(root, _records(8))
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(PYTHONPATH=os.pathsep.join([str(root_repo), env.get("PYTHONPATH", "")]),
               XDG_CACHE_HOME=str(tmp_path / "c"))
    tfds_cli = Path(sys.executable).with_name("tfds")
    command = [str(tfds_cli)] if tfds_cli.exists() else [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main"]
    config = json.dumps({"name": "from_tars", "layout": "webdataset", "min_side": 32})
    proc = subprocess.run(command + ["build", str(root_repo / "tfds_anchor" / "anchor"), "--config", config,
                                     "--manual_dir", str(root), "--data_dir", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "anchor/from_tars: read 8 records, kept 8" in proc.stdout
    assert "from the webdataset layout" in proc.stdout


def test_symlinked_folders_inside_are_walked_once_and_outside_never(tmp_path):
    root = tmp_path / "manual"
    records = _records(8)
    write_folders(tmp_path / "elsewhere", _records(4, start=40))
    write_folders(root / "all", records)
    (root / "train").symlink_to(root / "all" / "train")        # inside: walked once, under one of its names
    (root / "loop").symlink_to(root)                           # a loop: never walked twice
    (root / "out").symlink_to(tmp_path / "elsewhere")          # leads out: not walked, noted
    builder = build(root, tmp_path / "data")
    report = read_report(builder.data_path)
    assert report["skipped"] == {}
    assert set(examples(builder)) == {r["id"] for r in records}
    assert report["notes"]["symlinked folders leading out of the manual directory (not read)"] == 1
