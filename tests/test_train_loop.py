"""The training loop end to end, as users run it (`python -m launch.train` in subprocesses): NaN
halts before any checkpoint of it; and as pod users run it: two processes × 4 devices killed and
resumed bitwise, restarted on one process of 8 or 4 devices, a SIGTERM to one process and the death
of one. (One process killed and resumed bitwise: in test_gcs.py, from a bucket. Ctrl-C on one
process: in test_train_errors.py.)"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tiny demo config, made smaller still: 32² images, batch 2, the denoising loss only. What these
# runs check (signals, resume, NaN, meshes, exports) does not depend on the loss, and ReFL doubles
# the compile; the loop with ReFL runs end to end in test_demo.py, its step on 8 devices in
# test_train_step.py.
SMALL = ["--config.data.resolution=32", "--config.data.batch_size=2", "--config.loss.kind=denoising",
         "--config.sample.every=0", "--config.export.enabled=false", "--config.log_every=5",
         "--config.optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A built anchor/sample and a shared XLA compilation cache (the runs compile the same step)."""
    root = tmp_path_factory.mktemp("train_loop")
    data_dir = root / "tfds"
    subprocess.run([sys.executable, "-c", "from safe_jax.data import data_source; "
                    f"data_source('anchor/sample', data_dir={str(data_dir)!r})"], check=True, cwd=ROOT,
                   capture_output=True)
    return {"data_dir": str(data_dir), "cache": str(root / "xla_cache")}


def _command(env, workdir, *overrides, devices=1):
    cmd = [sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny_safe.py",
           f"--config.workdir={workdir}", f"--config.data.data_dir={env['data_dir']}", *SMALL, *overrides]
    proc_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_COMPILATION_CACHE_DIR=env["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    PYTHONUNBUFFERED="1")
    return cmd, proc_env


def _run(env, workdir, *overrides, devices=1, timeout=600):
    cmd, proc_env = _command(env, workdir, *overrides, devices=devices)
    return subprocess.run(cmd, env=proc_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class _Logged(subprocess.Popen):
    """A run whose output goes to a file beside its workdir, not to a pipe: a pipe nobody reads
    while the test polls can fill and stall the run, and a failure can then quote the first error
    of the whole log, not only its end."""

    _count = itertools.count()

    def __init__(self, cmd, env, workdir):
        self.log = Path(workdir).parent / f"{Path(workdir).name}.{next(self._count)}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            super().__init__(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)

    def communicate(self, input=None, timeout=None):
        self.wait(timeout)
        return "", self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _why(output: str) -> str:
    """A failed run's first traceback (the cause) and its last lines (how it ended)."""
    first = output.find("Traceback")
    head = output[first:first + 3000] + "\n...\n" if 0 <= first < len(output) - 3000 else ""
    return head + output[-3000:]


def _start(env, workdir, *overrides, devices=1, extra=()):
    cmd, proc_env = _command(env, workdir, *overrides, devices=devices)
    return _Logged(cmd + list(extra), proc_env, workdir)


def _wait_for(predicate, proc, timeout=600):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.log}):\n" + _why(proc.output()))
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def _saved_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    import jax

    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path).item_metadata
    # as numpy on this process, whatever topology saved it
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), getattr(meta, "tree", meta),
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))

    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _metrics(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows}  # a resumed run re-logs steps: the last line wins


def test_nan_halts_before_any_checkpoint_of_it(env, tmp_path):
    # lr 1e38 sends the weights to ~1e38 after one update: the next forward pass overflows.
    res = _run(env, tmp_path, "--config.nan_policy=halt", "--config.optim.lr=1e38", "--config.optim.clip_norm=0",
               "--config.optim.schedule=constant", "--config.steps=6",
               "--config.checkpoint.every=1", "--config.checkpoint.async_save=false")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "non-finite loss or gradient at step" in res.stderr
    bad = int(res.stderr.split("non-finite loss or gradient at step ")[1].split()[0].rstrip(";"))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad for s in saved)
    for s in saved:
        assert all(np.isfinite(v).all() for v in _saved_state(tmp_path, s).values() if v.dtype.kind == "f")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The full UNet, FSDP over 4 devices, data-parallel over 2. A constant learning rate: the state at
# a step does not depend on config.steps.
TWO = ["--config.mode=full", "--config.mesh.data=2", "--config.mesh.fsdp=4",
       "--config.data.batch_size=8", "--config.checkpoint.best_metric=", "--config.checkpoint.keep=10",
       "--config.optim.schedule=constant"]


def _start_two(env, workdir, *overrides, heartbeat=None):
    """Two processes of 4 CPU devices each (jax.distributed, gloo on loopback)."""
    port = _free_port()
    extra = [f"--heartbeat_timeout={heartbeat}"] if heartbeat else []
    return [_start(env, workdir, *TWO, *overrides, devices=4,
                   extra=[f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *extra])
            for i in range(2)]


def _finish(procs, timeout=900):
    for proc in procs:
        _, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{proc.log}:\n" + _why(stderr)
        yield stderr


def _params_rel(a: dict, b: dict) -> float:
    params = [k for k in a if k.startswith("['params']")]
    assert params and a.keys() == b.keys()
    flat = lambda d: np.concatenate([np.ravel(d[k]).astype(np.float64) for k in params])
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a)))


def _export_rel(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file
    file = "export/unet/diffusion_pytorch_model.safetensors"
    ea, eb = load_file(str(a / file)), load_file(str(b / file))
    assert ea.keys() == eb.keys()
    diff = np.sqrt(sum(float(np.sum((ea[k] - eb[k]).astype(np.float64) ** 2)) for k in ea))
    return float(diff / np.sqrt(sum(float(np.sum(ea[k].astype(np.float64) ** 2)) for k in ea)))


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_two_processes_kill_sigterm_resume_and_restart_on_other_meshes(env, tmp_path):
    """Pod runs, 2 processes × 4 devices (one multi-process run at a time on the machine).

    One workdir goes through every failure in turn: kill -9 of both processes after the step-3
    checkpoint; a resume, then kill -9 of one process (the other ends within the heartbeat timeout,
    naming the dead task, no hang); a resume, then SIGTERM to one process (both stop after the
    same step, one checkpoint, exit 0); a last resume that finishes. Its step-6 checkpoint is
    bitwise the uninterrupted run's. That run's step-3 checkpoint, resumed on 1 process × 8
    devices and on 1 × 4, ends within 1e-6 of it (the same global batches, other reduction
    orders), and the 1 × 8 export equals the two-process export."""
    import shutil

    straight = tmp_path / "straight"
    list(_finish(_start_two(env, straight, "--config.steps=6", "--config.checkpoint.every=3",
                            "--config.export.enabled=true")))
    a = _saved_state(straight, 6)
    mu = [k for k in a if k.startswith("['opt_state']") and "mu" in k]
    assert int(a["['step']"]) == 6 and mu and all(np.abs(a[k]).max() > 0 for k in mu)  # real updates

    # (The constant learning rate makes the state at step 6 independent of config.steps.)
    run = tmp_path / "interrupted"
    long = ("--config.steps=1000", "--config.checkpoint.every=3", "--config.log_every=1")
    procs = _start_two(env, run, *long)
    _wait_for(lambda: (run / "checkpoints" / "3").is_dir(), procs[0])
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=60)
    assert _checkpoints(run) == [3]

    procs = _start_two(env, run, *long, heartbeat=5)
    _wait_for(lambda: "step 4:" in procs[0].output(), procs[0])  # this run's own log, not the file's
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, stderr = procs[0].communicate(timeout=120)
    assert time.time() - killed_at < 60 and procs[0].returncode != 0, f"{procs[0].log}:\n" + _why(stderr)
    assert "another task died" in stderr and "at step 3 " in stderr, _why(stderr)
    procs[1].wait(timeout=60)

    procs = _start_two(env, run, *long)
    _wait_for(lambda: (run / "checkpoints" / "6").is_dir() and "step 7:" in procs[0].output(), procs[0])
    procs[1].send_signal(signal.SIGTERM)
    stderr = list(_finish(procs, timeout=300))
    steps = [int(e.split("preempted at step ")[1].split(";")[0]) for e in stderr]
    assert steps[0] == steps[1] > 6, stderr
    assert _checkpoints(run) == sorted({*range(3, steps[0] + 1, 3), steps[0]})  # one more: the stop's
    b = _saved_state(run, 6)
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs after kill -9, resume, kill -9 of one and resume"

    stderr = list(_finish(_start_two(env, run, f"--config.steps={steps[0] + 2}", "--config.log_every=1")))
    assert f"at step {steps[0]} " in stderr[0] and f"finished at step {steps[0] + 2}" in stderr[0], _why(stderr[0])

    for name, devices, mesh in (("eight", 8, "--config.mesh.data=2"), ("four", 4, "--config.mesh.data=1")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(straight / "checkpoints" / "3", tmp_path / name / "checkpoints" / "3")
        res = _run(env, tmp_path / name, *TWO, mesh, "--config.steps=6", "--config.checkpoint.every=3",
                   f"--config.export.enabled={name == 'eight'}", devices=devices)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"at step 3 (1 process(es), {devices} device(s))" in res.stderr, res.stderr[-2000:]
        assert _params_rel(a, _saved_state(tmp_path / name, 6)) <= 1e-6, name
    # The 1 × 8 continuation exported the same UNet as the two processes (process 0 wrote it there).
    assert _export_rel(straight, tmp_path / "eight") <= 1e-6


