"""Images per second per host of the full input pipeline at 512², and what each stage costs.

Builds a manual directory of pictures of the synthetic news world with film grain (768×512 and
512×768 JPEGs, ~110 KB, photo-sized as stored by the builder's default 768 cap), builds ``anchor/default`` from it, then times the whole
pipeline (ArrayRecord read → tf.Example parse → JPEG decode → crop → flip → [-1, 1] → tokenise with
subject weights → batch → worker processes) for several worker/thread settings, and the stages one
at a time on one core.

    python benchmarks/input_pipeline.py [--images 256] [--batch 32] [--batches 40] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(root: Path, n: int) -> str:
    import tensorflow_datasets as tfds

    from tfds_anchor.anchor import synthetic

    data_dir = root / "tfds"
    if not (data_dir / "anchor" / "default").exists():
        t = time.perf_counter()
        synthetic.write_manual_dir(root / "manual", n, seed=1, size=(768, 512), subjects=True, entities=False,
                                   grain=True)
        tfds.builder("anchor/default", data_dir=str(data_dir)).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(root / "manual")))
        print(f"built {n} records in {time.perf_counter() - t:.1f} s")
    return str(data_dir)


def stages(data_dir: str, tokenizer, resolution: int, n: int = 200) -> None:
    """One core, one record at a time: where the time goes."""
    import numpy as np

    from safe_jax.data import data_source, load_image
    from safe_jax.text.conditioning import subject_token_weights

    source = data_source("anchor/default", "train", data_dir)
    n = min(n, len(source))
    t = time.perf_counter()
    records = [source[i] for i in range(n)]
    read = (time.perf_counter() - t) / n
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for r in records:
        load_image(r["image"], resolution, "center", True, rng, "uint8")
    decode = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for r in records:
        load_image(r["image"], resolution, "center", True, rng, "float32")
    decode_f32 = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for r in records:
        subject_token_weights(tokenizer, [r["caption"].decode()], [[s.decode() for s in r["subjects"]]])
    tok = (time.perf_counter() - t) / n
    size = sum(len(r["image"]) for r in records) / n / 1024
    print(f"\nstages, one core, per image (JPEG {size:.0f} KB):")
    print(f"  read + parse record     {read * 1e3:6.2f} ms")
    print(f"  decode + crop + flip    {decode * 1e3:6.2f} ms   (uint8 out)")
    print(f"  ... + scale to [-1, 1]  {decode_f32 * 1e3:6.2f} ms   (float32 out)")
    print(f"  tokenise with weights   {tok * 1e3:6.2f} ms")
    total = read + decode_f32 + tok
    print(f"  sum {total * 1e3:.2f} ms → {1 / total:.0f} images/s per core, "
          f"{os.cpu_count() / total:.0f} on {os.cpu_count()} cores if nothing else ran")


def _cpu_seconds() -> float:
    """CPU time of this process and its worker processes so far."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def throughput(data_dir: str, tokenizer, args, workers: int, threads: int, dtype: str,
               global_arrays: bool = True) -> tuple[float, float]:
    """(images/s wall, CPU-seconds per image) of global batches on this host's devices, images float32
    in [-1, 1], each waited for; or of the host batches alone (``global_arrays=False``)."""
    import jax

    from safe_jax.data import GlobalBatches, InputConfig, make_iterator

    cfg = InputConfig(name="anchor/default", data_dir=data_dir, resolution=args.resolution, batch_size=args.batch,
                      crop="random", flip=True, image_dtype=dtype, worker_count=workers, read_threads=threads,
                      worker_buffer_size=2, prefetch=2 * args.batch)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    host = make_iterator(cfg, tokenizer, shard=(0, 1))
    with GlobalBatches(host, mesh) as batches:
        step = (lambda: next(batches)["images"].block_until_ready()) if global_arrays else (lambda: next(host))
        for _ in range(args.warmup):  # worker start-up and the scaling's compile: not timed
            step()
        t, cpu = time.perf_counter(), _cpu_seconds()
        for _ in range(args.batches):
            step()
        dt, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    del batches, host
    n = args.batches * args.batch
    return n / dt, cpu / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["uint8", "float32"], help="what the workers ship")
    p.add_argument("--dir", default=None, help="reuse this folder for the built dataset")
    args = p.parse_args()

    import gc

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    from safe_jax.text.tokenizer import tiny_tokenizer

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="anchor-bench-"))
    data_dir = build(root, args.images)
    tokenizer = tiny_tokenizer()
    print(f"\nmachine: {os.cpu_count()} cores; pipeline at {args.resolution}², per-host batch {args.batch}, "
          f"{args.batches} batches timed after {args.warmup}")
    stages(data_dir, tokenizer, args.resolution)
    cores = os.cpu_count()
    print("\nfull pipeline (random crop, flip, subject weights), per host. 'images/s' is measured wall-clock;")
    print(f"'CPU ms/img' sums this process and its workers; 'if {cores} cores free' = the decoders that can run at")
    print("once (≤ cores) / CPU time per image: an estimate of the rate on an otherwise idle machine of this")
    print("size (the measured one shares its cores with whatever else runs). 'global': through GlobalBatches to jax.Arrays in [-1, 1] (on this CPU-only")
    print("machine the device copy and scaling use the same two cores); 'host': the grain batches alone.")
    print(f"  {'to':>6} {'workers':>7} {'threads':>7} {'shipped':>8} {'images/s':>9} {'CPU ms/img':>10} "
          f"{'if ' + str(cores) + ' cores free':>16}")
    for dtype in args.dtypes:
        for target in ("global", "host"):
            for workers in args.workers:
                for threads in args.threads:
                    rate, cpu = throughput(data_dir, tokenizer, args, workers, threads, dtype, target == "global")
                    gc.collect()
                    parallel = min(cores, max(workers, 1) * threads)  # decoders that can run at once
                    print(f"  {target:>6} {workers:>7} {threads:>7} {dtype:>8} {rate:>9.0f} {cpu * 1e3:>10.2f} "
                          f"{parallel / cpu:>16.0f}", flush=True)


if __name__ == "__main__":
    main()
