"""`safe-jax train` and `safe-jax export` when things go wrong: a bad flag or config value is one
line on stderr and exit code 2 before anything is compiled; an exception in the training loop ends
cleanly (no segfault, the last good checkpoint intact); a resumed run keeps one metrics line per
step; Ctrl-C saves and exits 0; re-running a finished run says so without compiling."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from test_checkpointing import _position, _state
from test_train_loop import (
    ROOT,
    _command,
    _metrics,
    _saved_state,
    _start,
    _wait_for,
    env,  # noqa: F401 (a fixture: the built data set and XLA cache)
)

from safe_jax.errors import SafeJaxError

TINY = ["--config", "launch/configs/tiny_safe.py"]
CPU = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _cli(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=CPU, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the flag or field, exit 2, nothing compiled or written
# --------------------------------------------------------------------------------------------

# (arguments after `--config launch/configs/tiny_safe.py --config.workdir=<tmp>/run`, what the line says)
TRAIN_CASES = [
    (["--config.optim.lrr=1e-4"],
     "--config.optim.lrr: config.optim has no field 'lrr' (did you mean config.optim.lr?)"),
    (["--config.steps=-5"], "config.steps must be ≥ 1, got -5"),
    (["--config.checkpoint.every=0"], "config.checkpoint.every must be ≥ 1, got 0"),
    (["--config.steps=abc"], "--config.steps=abc"),
    (["--config.optim.lr=nan"], "config.optim.lr must be a finite number"),
    (["--config.data.resolution=60"], "config.data.resolution must be a multiple of 8"),
    (["--config.loss.kind=l2"], "config.loss.kind must be one of"),
    (["--config.loss.refl_step_max=10"], "config.loss.refl_step_max < config.loss.refl_steps"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one of config.mesh.data, config.mesh.fsdp"),
    (["--config.workdir=/proc/x"], "config.workdir: cannot write to /proc/x"),
    (["--config.workdir={file}/x"], "config.workdir: cannot create"),
    (["--config.export.dir={file}/x"], "config.export.dir: cannot create"),
    (["extra"], "unexpected argument 'extra'"),
    # after the device checks, before the model is loaded: the data source cannot be opened
    (["--config.data.name=no_such_dataset"], "config.data.name / split / data_dir: cannot open 'no_such_dataset'"),
]


@pytest.mark.parametrize("args,message", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_bad_train_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "file").write_text("a regular file")
    workdir = tmp_path / "run"
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    res = _cli("launch.train", *TINY, f"--config.workdir={workdir}", *args)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _one_line(res)
    assert line.startswith("safe-jax train: error: ") and message in line, line
    assert not workdir.exists()  # failed before anything was set up (no checkpoints, no compile)


@pytest.mark.parametrize("args,message", [
    (["--config", "/no/such/file.py"], "--config: no such config file: /no/such/file.py"),
    (["--config", "/no/such/file.py", "--config.steps=3"], "--config: no such config file"),
    ([], "--config is required"),
])
def test_bad_config_file_is_one_line_and_exit_2(args, message):
    res = _cli("launch.train", *args)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _one_line(res)
    assert line.startswith("safe-jax train: error: ") and message in line, line


@pytest.mark.parametrize("out,message", [
    ("/proc/x", "argument --out: cannot write to /proc/x"),
    ("{file}/x", "argument --out: cannot create"),
    ("{file}", "argument --out: {file} exists and is not a directory"),
])
def test_bad_export_out_is_one_line_and_exit_2(tmp_path, out, message):
    file = tmp_path / "file"
    file.write_text("a regular file")
    res = _cli("launch.export", "--model", "tiny", "--out", out.replace("{file}", str(file)))
    assert res.returncode == 2, res.stderr[-3000:]
    line = _one_line(res)
    assert line.startswith("safe-jax export: error: ") and message.replace("{file}", str(file)) in line, line


# Every field of the base config, checked in-process (the subprocess table above covers the ways in).
FIELD_CASES = [
    ("steps", 0), ("seed", -1), ("mode", "partial"), ("lora_rank", 0), ("lora_alpha", -1.0), ("dtype", "int8"),
    ("attention_impl", "flash"), ("remat_policy", "sometimes"), ("model", "/no/such/model"),
    ("data.batch_size", 0), ("data.resolution", 4), ("data.crop", "middle"), ("data.flip", "yes"),
    ("subjects.weight", 0.0), ("subjects.weight", float("inf")), ("subjects.format", "xml"),
    ("data.worker_count", -1), ("data.read_threads", -1), ("mesh.tensor", 0),
    ("loss.mix", "sum"), ("subjects.weighting", "mean"), ("loss.cond_dropout", 1.5), ("loss.refl_steps", 0),
    ("loss.refl_grad_scale", 0.0), ("loss.min_snr_gamma", 0.0), ("reward.name", "beauty"),
    ("reward.clip", "/no/such/clip"), ("optim.lr", 0.0), ("optim.lr", float("inf")), ("optim.schedule", "linear"),
    ("optim.warmup_steps", -1), ("optim.accumulate", 0), ("optim.ema_decay", 1.0), ("optim.clip_norm", -1.0),
    ("nan_policy", "ignore"), ("checkpoint.keep", 0), ("checkpoint.best_mode", "lowest"), ("log_every", 0),
    ("peak_tflops", 0.0), ("sample.every", -1), ("sample.steps", 0), ("sample.scheduler", "plms"),
    ("export.dtype", "int8"), ("export.enabled", 1),
]


@pytest.mark.parametrize("field,value", FIELD_CASES, ids=[f"{f}={v}" for f, v in FIELD_CASES])
def test_validate_config_names_the_field(field, value):
    from launch.configs import tiny_safe
    from safe_jax.train.config_check import validate_config

    config = tiny_safe.get_config()
    config.unlock()
    *groups, leaf = field.split(".")
    node = config
    for g in groups:
        node = node[g]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(SafeJaxError, match=f"config.{field.replace('.', '[.]')}"):
        validate_config(config, check_devices=False)


def test_validate_config_accepts_the_shipped_configs_and_refuses_unknown_fields():
    from launch.configs import base, sd15_safe, sd21_safe, sdxl_safe, tiny_safe
    from safe_jax.train.config_check import validate_config

    for module in (base, tiny_safe, sd15_safe, sd21_safe, sdxl_safe):
        config = module.get_config()
        config.model, config.reward.clip = "tiny", "tiny"  # the real recipes name local folders
        validate_config(config, devices=1)
    config = sdxl_safe.get_config()
    config.model, config.reward.clip = "tiny-xl", "tiny"
    validate_config(config, devices=8)  # the FSDP axis takes every device
    config = tiny_safe.get_config()
    config.unlock()
    config.optim.lrr = 1e-4
    with pytest.raises(SafeJaxError, match=r"config.optim.lrr is not a config field \(did you mean config.optim.lr"):
        validate_config(config, check_devices=False)
    config = tiny_safe.get_config()
    with pytest.raises(SafeJaxError, match="config.mesh does not fit the 1 device"):
        config.mesh.data = 2
        validate_config(config, devices=1)


# --------------------------------------------------------------------------------------------
# Pieces of the loop, in-process
# --------------------------------------------------------------------------------------------

def test_every_checkpoint_unreadable_warns_starting_over(tmp_path, caplog):
    from safe_jax.train.checkpoints import Checkpointer

    with Checkpointer(tmp_path, keep=3, best_metric=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), _position(step), {"step": step})
    for f in (tmp_path / "1" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size:
            f.write_bytes(b"\x00garbage")
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size:
            f.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="safe_jax.train.checkpoints"), Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(_state(0)) is None
    loud = [r for r in caplog.records if "starting over from step 0" in r.getMessage()]
    assert len(loud) == 1 and loud[0].levelno == logging.WARNING
    assert "unreadable-1-" in loud[0].getMessage() and "unreadable-2-" in loud[0].getMessage()


def test_metric_writer_drops_lines_after_the_resumed_step(tmp_path):
    from safe_jax.train.metrics import MetricWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 10)) + '{"step": 10, "lo')
    writer = MetricWriter(tmp_path, enabled=True, resume_step=4)
    for step in range(5, 8):
        writer.scalars(step, {"loss": 1.0})
    writer.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == list(range(1, 8))
    assert _metrics(tmp_path)[4]["loss"] == 0.4 and _metrics(tmp_path)[5]["loss"] == 1.0


def test_resources_close_in_order_and_keep_the_first_error():
    from safe_jax.train.loop import _Resources

    closed = []

    class Thing:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def close(self):
            closed.append(self.name)
            if self.fail:
                raise OSError(f"{self.name} failed")

    with pytest.raises(ZeroDivisionError):
        with _Resources() as res:
            for name in ("data", "writer", "checkpointer", "progress"):  # opened in another order
                res.add(name, Thing(name, fail=name == "data"))
            1 / 0
    assert closed == ["checkpointer", "data", "progress", "writer"]
    closed.clear()
    with pytest.raises(OSError, match="checkpointer failed"):  # a clean run whose last save failed is an error
        with _Resources() as res:
            res.add("writer", Thing("writer"))
            res.add("checkpointer", Thing("checkpointer", fail=True))
    assert closed == ["checkpointer", "writer"]


def test_ctrl_c_requests_a_save_and_a_second_one_stops_at_once():
    from safe_jax.train.loop import _Preemption

    before = signal.getsignal(signal.SIGINT)
    with _Preemption() as preemption:
        assert not preemption.requested(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.requested(2) and preemption.status == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_requests_a_save_and_the_handlers_are_put_back():
    """One process: SIGTERM is handled as Ctrl-C is (test_ctrl_c_saves_and_exits_0 runs that end
    to end), reported as a preemption. Several processes: the two-process test in test_train_loop."""
    from safe_jax.train.loop import _Preemption

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with _Preemption() as preemption:
        assert not preemption.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested(2) and preemption.status == "preempted"
    assert {s: signal.getsignal(s) for s in before} == before


def test_finished_step_needs_the_checkpoint_and_a_newer_export(tmp_path):
    from safe_jax.train.loop import _finished_step

    ckpts, export = tmp_path / "checkpoints", tmp_path / "export"
    assert _finished_step(ckpts, 10, None) is None
    (ckpts / "5").mkdir(parents=True)
    (ckpts / "10.orbax-checkpoint-tmp-1").mkdir()  # a save cut short
    assert _finished_step(ckpts, 10, None) is None
    (ckpts / "10").mkdir()
    os.utime(ckpts / "10", (1e9, 1e9))
    assert _finished_step(ckpts, 10, None) == 10
    assert _finished_step(ckpts, 10, export) is None  # no export yet
    export.mkdir()
    (export / "model_index.json").write_text("{}")
    assert _finished_step(ckpts, 10, export) == 10
    os.utime(export / "model_index.json", (1e8, 1e8))  # an export older than the checkpoint
    assert _finished_step(ckpts, 10, export) is None


# --------------------------------------------------------------------------------------------
# The loop end to end (subprocesses; one compile shared through the XLA cache)
# --------------------------------------------------------------------------------------------

COMMON = ["--config.steps=12", "--config.checkpoint.every=4", "--config.checkpoint.keep=10",
          "--config.checkpoint.best_metric="]
# The loop with a metric that raises at step 10 (after the saves at 4 and 8, with step 11 in flight).
RAISE_AT_10 = """
import sys
import safe_jax.train.loop as t
record = t._Monitor.record
def failing(self, step, metrics):
    if step == 10:
        raise ZeroDivisionError("a metric divided by zero")
    return record(self, step, metrics)
t._Monitor.record = failing
from launch.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def crashed_then_resumed(env, tmp_path_factory):
    """A run whose loop raises at step 10; its newest checkpoint (8) damaged; the same command
    again (falls back to 4, finishes at 12); and once more (already finished)."""
    workdir = tmp_path_factory.mktemp("crash") / "run"
    cmd, proc_env = _command(env, workdir, *COMMON)
    patched = cmd[:1] + ["-c", RAISE_AT_10] + cmd[3:]
    crashed = subprocess.run(patched, env=proc_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    metrics_after_crash = (workdir / "metrics.jsonl").read_text()
    readable_8 = _saved_state(workdir, 8) if (workdir / "checkpoints" / "8").is_dir() else None
    for f in (workdir / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size:
            f.write_bytes(b"\x00garbage")
    resumed = subprocess.run(cmd, env=proc_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    again = subprocess.run(cmd, env=proc_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return dict(workdir=workdir, crashed=crashed, resumed=resumed, again=again, readable_8=readable_8,
                metrics_after_crash=metrics_after_crash)


@pytest.mark.slow
def test_an_exception_in_the_loop_ends_cleanly(crashed_then_resumed):
    run = crashed_then_resumed
    res, workdir = run["crashed"], run["workdir"]
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])  # not -11 / 139: no segfault
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("safe-jax train: error: unexpected ZeroDivisionError: a metric divided by zero "
                           f"(the last good checkpoint is step 8 in {workdir / 'checkpoints'})"), last
    assert "Traceback" not in res.stderr
    assert "ZeroDivisionError" in (workdir / "traceback.log").read_text()
    assert run["readable_8"] is not None and int(run["readable_8"]["['step']"]) == 8  # intact and restorable
    assert [json.loads(line)["step"] for line in run["metrics_after_crash"].splitlines()] == list(range(1, 10))


@pytest.mark.slow
def test_resume_after_a_fallback_keeps_one_metrics_line_per_step(crashed_then_resumed):
    res, workdir = crashed_then_resumed["resumed"], crashed_then_resumed["workdir"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint 8" in res.stderr and "cannot be read" in res.stderr and "at step 4" in res.stderr
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert int(_saved_state(workdir, 12)["['step']"]) == 12


@pytest.mark.slow
def test_rerunning_a_finished_run_exits_0_without_compiling(crashed_then_resumed):
    res, workdir = crashed_then_resumed["again"], crashed_then_resumed["workdir"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"safe-jax train: already finished at step 12; workdir {workdir}" in res.stderr
    assert "compiled" not in res.stderr and "resumed" not in res.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_0(env, tmp_path):
    proc = _start(env, tmp_path, *COMMON[:1], "--config.checkpoint.every=1000")
    _wait_for(lambda: (tmp_path / "metrics.jsonl").is_file()
              and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert step < 12
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [step] and max(_metrics(tmp_path)) == step


def test_resuming_with_another_global_batch_is_refused():
    """The data position is a number of global batches: another global batch size would read
    other records, so a resume with one is refused in one line naming the fix."""
    from safe_jax.train.loop import _check_data_position

    _check_data_position({"batches": 3, "global_batch": 8}, 3, 8)  # any mesh or process count: fine
    with pytest.raises(SafeJaxError, match=r"trained with a global batch of 8, this run's is 4: resume with "
                                           r"--config.data.batch_size=8"):
        _check_data_position({"batches": 3, "global_batch": 8}, 3, 4)
    with pytest.raises(SafeJaxError, match="records a data position of 2 batches"):
        _check_data_position({"batches": 2, "global_batch": 8}, 3, 8)
