"""One loop for every pre-training task: from a config to checkpoints, metrics and an export.

    result = train(config)          # config: launch/configs/world_*.py, an ml_collections ConfigDict

A task (``vae``, ``clip``, ``unet``) says what is trained and how it is judged: its parameters,
its batches (``data.StepBatches``: the batch of step s is a pure function of the seed and s), its
train step, held-out metrics, sample pictures and export. Everything else is here, the same for
all: AdamW, the step compiled once with a donated state, orbax checkpoints through the training
``Checkpointer`` (resume is bitwise: state and data position are the step), ``metrics.jsonl``
and TensorBoard, a progress bar, SIGTERM / Ctrl-C saving, and ``summary.json`` at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import numpy as np
import optax

from safe_jax import sharding
from safe_jax.errors import SafeJaxError
from safe_jax.pretrain.config_check import validate
from safe_jax.pretrain.data import StepBatches
from safe_jax.train import step as train_step
from safe_jax.train.checkpoints import Checkpointer
from safe_jax.train.metrics import MetricWriter, compiled_flops
from safe_jax.train.step import TrainState

log = logging.getLogger(__name__)

LossFn = Callable[[Any, dict, dict, jax.Array], "tuple[jax.Array, dict]"]  # (params, frozen, batch, key)


class Task(Protocol):
    """What a pre-training task gives the loop (``safe_jax.pretrain.{vae,clip,unet}``)."""

    curves: tuple[str, ...]                        # metrics.jsonl keys worth a loss-curve plot

    def init(self, seed: int) -> tuple[Any, dict]: ...          # (trainable, frozen) host trees
    def batches(self) -> StepBatches: ...
    def make_step(self, tx: optax.GradientTransformation, ema_decay: float | None): ...
    def evaluate(self, params: Any, frozen: dict) -> dict[str, float]: ...   # held-out metrics
    def samples(self, params: Any, frozen: dict) -> np.ndarray | None: ...   # uint8 picture
    def export(self, params: Any, frozen: dict, out_dir: Path) -> dict: ...  # what it wrote


def make_task(config: Any) -> Task:
    from safe_jax.pretrain import clip, unet, vae

    return {"vae": vae.VAETask, "clip": clip.CLIPTask, "unet": unet.UNetTask}[config.task](config)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (no decay on biases, norms and scalars) on warmup + cosine/constant, with clipping."""
    lr = train_step.lr_schedule(optim.lr, optim.warmup_steps, total_steps, optim.schedule)
    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
    chain.append(optax.adamw(lr, b1=0.9, b2=optim.b2, eps=1e-8, weight_decay=optim.weight_decay, mask=decay))
    return optax.chain(*chain), lr


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float | None = None):
    """``step(state, frozen, batch) -> (state, metrics)``: gradient of ``loss_fn``, AdamW, EMA.
    A non-finite loss or gradient leaves the parameters as they were (``finite`` says so)."""

    def step(state: TrainState, frozen: dict, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        return train_step.apply_gradients(state, loss, grads, metrics, tx, ema_decay)

    return step


@dataclasses.dataclass
class Result:
    workdir: Path
    step: int
    status: str                  # "finished", "stopped" (stop_at), "preempted" (SIGTERM) or "interrupted" (Ctrl-C)
    export_dir: Path | None
    curves: tuple[str, ...] = ()
    already_finished: bool = False


def train(config: Any, stop_at: int | None = None) -> Result:
    """Run or resume ``config``'s task; with ``stop_at`` < steps, save at that step and stop there
    (the run goes on from it when called again). A run already finished returns at once."""
    validate(config)
    workdir = Path(config.workdir)
    export_dir = Path(config.export.dir or workdir / "export")
    summary_path = workdir / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("step") == config.steps:
        log.info("already finished at step %d; workdir %s", config.steps, workdir)
        return Result(workdir, config.steps, "finished", export_dir, already_finished=True)
    if stop_at is not None and not 1 <= stop_at <= config.steps:
        raise SafeJaxError(f"stop_at must be in [1, config.steps = {config.steps}], got {stop_at}")
    end = config.steps if stop_at is None else stop_at

    task = make_task(config)
    data = task.batches()
    try:
        return _run(config, task, data, workdir, export_dir, end)
    finally:
        data.close()


def _run(config: Any, task: Task, data: StepBatches, workdir: Path, export_dir: Path, end: int) -> Result:
    mesh = sharding.make_mesh(devices=jax.local_devices())
    if config.data.batch_size % mesh.size:
        raise SafeJaxError(f"config.data.batch_size ({config.data.batch_size}) must be a multiple of the "
                           f"{mesh.size} local devices")
    params, frozen = task.init(config.seed)
    tx, lr = make_optimizer(config.optim, config.steps)
    ema = config.optim.ema_decay
    state = train_step.init_state(params, tx, seed=config.seed, ema=ema is not None)
    state_sh, frozen_sh = sharding.shardings_for(state, mesh), sharding.shardings_for(frozen, mesh)
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    batch_sh = sharding.batch_sharding(mesh)

    resolved = json.loads(config.to_json())
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, best_metric=None)
    try:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        restored = ckpt.restore_latest(abstract)
        if restored is not None:
            state = restored[0]
            data.check(restored[2])
            log.info("resumed from %s at step %d", ckpt.directory, int(sharding.local_value(state.step)))
        start = int(sharding.local_value(state.step))
        t0 = time.perf_counter()
        step_fn = _compile(task, tx, ema, state, frozen, data(start), mesh, resolved)
        flops = compiled_flops(step_fn)
        log.info("%s train step compiled in %.1f s (%s GFLOP a step)", config.task, time.perf_counter() - t0,
                 f"{flops / 1e9:.1f}" if flops else "?")
        writer = MetricWriter(workdir, enabled=True, resume_step=start)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        try:
            state, step, status, times = _loop(config, task, data, step_fn, state, frozen, batch_sh, ckpt, writer,
                                               lr, start, end, resolved)
        finally:
            writer.close()
        ckpt.wait()
    finally:
        ckpt.close()
    if status != "finished" or step < config.steps:
        return Result(workdir, step, "stopped" if status == "finished" else status, None, task.curves)
    trained = sharding.host_copy(state.ema if state.ema is not None else state.params)
    written = task.export(trained, sharding.host_copy(frozen), export_dir)
    timing = np.asarray(times[1:] or times or [np.nan])  # the first step of a run waits for its batch
    summary = {"task": config.task, "step": step, "export": str(export_dir), **written,
               "step_time_median_s": float(np.median(timing)), "steps_timed": len(times),
               "step_gflop": flops / 1e9 if flops else None}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log.info("exported to %s", export_dir)
    return Result(workdir, step, "finished", export_dir, task.curves)


# Fields that change nothing in the compiled step (where a run writes, how often it logs and saves).
_RUN_ONLY = ("workdir", "checkpoint", "log_every", "eval_every", "eval_examples", "export", "sample")
_COMPILED: dict[str, Any] = {}


def _compile(task: Task, tx, ema, state, frozen, batch, mesh, resolved: dict) -> Any:
    """The compiled step; compiled once per process for one (config, task, shapes): a run stopped
    and resumed in the same process (``stop_at``) does not compile again."""
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), (state, frozen, batch))
    key = json.dumps([{k: v for k, v in resolved.items() if k not in _RUN_ONLY}, getattr(task, "static_key", ""),
                      str(shapes), str(mesh)], sort_keys=True, default=str)
    if key not in _COMPILED:
        _COMPILED[key] = train_step.compile_train_step(task.make_step(tx, ema), state, frozen, batch, mesh)
    return _COMPILED[key]


def _loop(config, task, data, step_fn, state, frozen, batch_sh, ckpt, writer, lr, start, end, resolved):
    """The steps from ``start`` to ``end``: (state, step reached, status, step times)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=config.task, unit="step", dynamic_ncols=True)
    times: list[float] = []
    pending = None  # (step, metrics) of the step in flight: read once the next one is dispatched
    last = time.perf_counter()
    status, step = "finished", start

    def record(at: int, metrics: dict, extra: dict | None = None) -> None:
        nonlocal last
        values = {k: float(sharding.local_value(v)) for k, v in metrics.items()}
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if not values.pop("finite"):
            log.warning("step %d: non-finite loss or gradient, update skipped", at)
        values.update(lr=float(lr(at - 1)), step_time=times[-1],
                      examples_per_s=config.data.batch_size / max(times[-1], 1e-9), **(extra or {}))
        writer.scalars(at, values, tensorboard=at % config.log_every == 0)
        bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
        bar.update(1)
        if at % config.log_every == 0:
            bar.write(f"step {at}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))

    with _Preemption() as preemption:
        try:
            while step < end:
                batch = jax.device_put(data(step), batch_sh)
                state, metrics = step_fn(state, frozen, batch)
                step += 1
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                stop = preemption.requested
                evaluate = step == config.steps or (config.eval_every and step % config.eval_every == 0)
                if evaluate:
                    record(*pending, extra=_evaluate(task, state, frozen, writer, step, Path(config.workdir)))
                    pending = None
                if step % config.checkpoint.every == 0 or step == end or stop:
                    if pending is not None:
                        record(*pending)
                        pending = None
                    ckpt.save(step, state, data.record(step), resolved)
                if stop:
                    status = preemption.status
                    log.warning("%s: saved step %d to %s; run the same command to resume", status, step,
                                ckpt.directory)
                    break
            if pending is not None:
                record(*pending)
        finally:
            bar.close()
    return state, step, status, times


def _evaluate(task: Task, state: TrainState, frozen: dict, writer: MetricWriter, step: int, workdir: Path) -> dict:
    """Held-out metrics (prefixed ``eval_``) and a sample picture of the weights the export would hold."""
    params = sharding.host_copy(state.ema if state.ema is not None else state.params)
    host_frozen = sharding.host_copy(frozen)
    metrics = {f"eval_{k}": float(v) for k, v in task.evaluate(params, host_frozen).items()}
    picture = task.samples(params, host_frozen)
    if picture is not None:
        from PIL import Image

        (workdir / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(workdir / "samples" / f"step_{step:07d}.png")
        writer.image(step, "samples", picture)
    return metrics


class _Preemption:
    """SIGTERM or Ctrl-C: finish the step, save, stop (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.requested = False
        self.status = "preempted"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Preemption":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            self.status = "interrupted"
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
