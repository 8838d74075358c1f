"""Two JAX processes (the distributed runtime on loopback, gloo collectives): disjoint shards whose
union is the epoch, and global batches assembled across both processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("grain")
pytest.importorskip("tensorflow_datasets")

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    from safe_jax.data import GlobalBatches, InputConfig, make_iterator
    from safe_jax.text.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = InputConfig(data_dir=data_dir, resolution=8, batch_size=6, num_epochs=1, worker_count=0,
                      flip=False, crop="center")
    ids = [bytes(i).decode() for b in make_iterator(cfg, tok) for i in b["image_id"]]  # shard from jax

    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices())
    host = make_iterator(cfg, tok)
    with GlobalBatches(host, mesh, "data") as batches:
        first = next(batches)
    local = first["input_ids"].addressable_shards[0].data
    total = jax.jit(lambda x: x.astype(np.float32).sum())(first["token_weights"])  # a cross-process reduction
    json.dump({"process": jax.process_index(), "count": jax.process_count(), "ids": ids,
               "global_shape": list(first["images"].shape), "local_rows": int(local.shape[0]),
               "weight_sum": float(total)}, open(out, "w"))
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_disjoint_shards_covering_the_epoch(tmp_path):
    from safe_jax.data import data_source

    data_dir = str(tmp_path / "tfds")
    n = len(data_source("anchor/sample", "train", data_dir))  # built here, read by both workers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "XLA_FLAGS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), data_dir, str(tmp_path / f"{i}.json")],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    a, b = (set(r["ids"]) for r in results)
    assert [r["process"] for r in results] == [0, 1] and all(r["count"] == 2 for r in results)
    # Batches of 6 are formed over the epoch, then dealt out in turn: process p takes batches p, p+2, ...
    assert n % 6 == 0  # whole batches, so together they hold the whole epoch
    assert [len(r["ids"]) for r in results] == [6 * len(range(p, n // 6, 2)) for p in range(2)]
    assert a.isdisjoint(b) and len(a | b) == n
    assert all(r["global_shape"] == [12, 8, 8, 3] and r["local_rows"] == 6 for r in results)
    assert results[0]["weight_sum"] == results[1]["weight_sum"] > 12 * 77  # the whole global batch, subjects > 1
