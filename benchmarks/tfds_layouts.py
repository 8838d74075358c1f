"""Records per second building ``anchor/default`` from each manual-directory layout, and peak memory.

Writes the same records of the synthetic news world (JPEGs with film grain, photo-sized; captions,
subjects, ids naming their source) in each of the five layouts the builder reads (anchor.jsonl, the authors' split folders,
imagefolder, parquet with embedded images, webdataset tar shards), then builds each in a fresh
process and prints wall time, records/s and the process's peak RSS. Run it at two sizes to see
that memory does not grow with the number of records. TFDS itself holds up to 1 GB of encoded
examples in memory before it shuffles through files on disk; ``--shuffle-buffer-mb 8`` lowers
that buffer so that the peak shows the builder's own memory.

    python benchmarks/tfds_layouts.py [--images 2000] [--size 512 384] [--cpus 2] [--layouts ...]
                                      [--shuffle-buffer-mb 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = ("anchor", "folders", "imagefolder", "parquet", "webdataset")
SUFFIXES = ("guardian", "bbc", "usa_today", "washington_post", "nytimes")
FOLDER = {"train": "train", "validation": "val", "test": "test"}


def records(n: int, size: tuple[int, int]) -> list[dict]:
    from tfds_anchor.anchor import synthetic, world_records
    from tfds_anchor.anchor.records import hash_split

    out = []
    for i, r in enumerate(world_records.pairs(n, seed=1, size=size, portrait_every=5)):
        rid = f"{i:06d}{SUFFIXES[i % len(SUFFIXES)]}"
        out.append({"id": rid, "caption": r.caption, "subjects": r.subjects, "split": hash_split(rid),
                    "image": synthetic.with_grain(r.image_bytes, (1, i))})
    return out


def write(layout: str, root: Path, rows: list[dict]) -> None:
    root.mkdir(parents=True)
    if layout == "anchor":
        (root / "images").mkdir()
        with open(root / "anchor.jsonl", "w") as f:
            for r in rows:
                (root / "images" / f"{r['id']}.jpg").write_bytes(r["image"])
                f.write(json.dumps({"id": r["id"], "caption": r["caption"], "image": f"images/{r['id']}.jpg",
                                    "split": r["split"], "subjects": r["subjects"]}) + "\n")
    elif layout == "folders":
        for r in rows:
            folder = root / FOLDER[r["split"]]
            folder.mkdir(exist_ok=True)
            (folder / f"{r['id']}.jpg").write_bytes(r["image"])
            (folder / f"{r['id']}.txt").write_text(r["caption"])
    elif layout == "imagefolder":
        for split in FOLDER:
            (root / split).mkdir()
        files = {split: open(root / split / "metadata.jsonl", "w") for split in FOLDER}
        for r in rows:
            (root / r["split"] / f"{r['id']}.jpg").write_bytes(r["image"])
            files[r["split"]].write(json.dumps({"file_name": f"{r['id']}.jpg", "text": r["caption"],
                                                "subjects": r["subjects"]}) + "\n")
        for f in files.values():
            f.close()
    elif layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        for split in FOLDER:
            part = [r for r in rows if r["split"] == split]
            for k in range(0, len(part), 500):  # datasets-style shards of 500 rows, row groups of 100
                chunk = part[k:k + 500]
                pq.write_table(pa.table({
                    "image": pa.array([{"bytes": r["image"], "path": f"{r['id']}.jpg"} for r in chunk], image),
                    "text": [r["caption"] for r in chunk],
                    "subjects": [r["subjects"] for r in chunk],
                }), root / f"{split}-{k // 500:05d}.parquet", row_group_size=100)
    elif layout == "webdataset":
        for k in range(0, len(rows), 500):  # img2dataset-style shards, split by a hash of the key
            with tarfile.open(root / f"{k // 500:05d}.tar", "w") as tar:
                for r in rows[k:k + 500]:
                    for ext, data in (("jpg", r["image"]), ("json", json.dumps({"status": "success"}).encode()),
                                      ("txt", r["caption"].encode())):
                        info = tarfile.TarInfo(f"{r['id']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


def child(manual: str, data_dir: str, shuffle_buffer_mb: int | None) -> None:
    """Build once, in this fresh process; print the numbers as JSON."""
    import tensorflow_datasets as tfds

    if shuffle_buffer_mb is not None:
        from tensorflow_datasets.core import shuffle

        shuffle.MAX_MEM_BUFFER_SIZE = shuffle_buffer_mb << 20

    import tfds_anchor  # noqa: F401
    from tfds_anchor.anchor.anchor_dataset_builder import build_report

    builder = tfds.builder("anchor/default", data_dir=data_dir)
    t = time.perf_counter()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    seconds = time.perf_counter() - t
    report = build_report(builder)
    print("RESULT" + json.dumps({"seconds": seconds, "kept": report["kept_total"], "layout": report["layout"],
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("W", "H"))
    p.add_argument("--cpus", type=int, default=2, help="cores the builds may use (sched_setaffinity)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--shuffle-buffer-mb", type=int, help="TFDS's in-memory shuffle buffer (default: TFDS's 1 GB)")
    p.add_argument("--child", nargs=2, metavar=("MANUAL", "DATA_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.shuffle_buffer_mb)
        return
    cpus = sorted(os.sched_getaffinity(0))[: args.cpus]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rows = records(args.images, tuple(args.size))
        size_kb = sum(len(r["image"]) for r in rows) / len(rows) / 1024
        print(f"{len(rows)} records, {args.size[0]}×{args.size[1]} JPEG ({size_kb:.0f} KB average), drawn in "
              f"{time.perf_counter() - t:.0f} s; building on {len(cpus)} core(s)")
        print(f"{'layout':<12} {'kept':>6} {'seconds':>8} {'records/s':>10} {'peak RSS':>10}")
        for layout in args.layouts:
            manual = Path(tmp) / layout
            write(layout, manual, rows)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [sys.executable, __file__, "--child", str(manual), str(Path(tmp) / f"data-{layout}")]
            if args.shuffle_buffer_mb is not None:
                command += ["--shuffle-buffer-mb", str(args.shuffle_buffer_mb)]
            proc = subprocess.run(command,
                                  capture_output=True, text=True, env=env,
                                  preexec_fn=lambda: os.sched_setaffinity(0, cpus))
            if proc.returncode:
                sys.exit(f"{layout}: build failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.split("RESULT", 1)[1])
            assert r["layout"] == layout, r
            print(f"{layout:<12} {r['kept']:>6} {r['seconds']:>8.1f} {r['kept'] / r['seconds']:>10.0f} "
                  f"{r['peak_rss_mb']:>8.0f} MB", flush=True)


if __name__ == "__main__":
    main()
