"""The SAFE training loop (Domain Fine-tuning): from a config to checkpoints and an exported model.

    result = train(config)        # config: launch/configs/base.py's fields, an ml_collections ConfigDict

The path of one step, top-down: ANCHOR batch (caption ids + subject token weights + image) →
subject-weighted conditioning → UNet (LoRA merged) → denoising / ReFL loss → AdamW update, all in
one compiled ``train_step`` (``safe_jax.train.step``). This module is the host side around it:
the mesh, the input pipeline, resuming from the latest checkpoint, metrics, samples, preemption,
and the export at the end. Every process runs this same function (multi-host: after
``jax.distributed.initialize``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from safe_jax import sharding
from safe_jax.data import GlobalBatches, InputConfig, data_source, make_iterator
from safe_jax.errors import SafeJaxError
from safe_jax.io import presets, storage
from safe_jax.sampling import schedulers
from safe_jax.sampling.stable_diffusion import StableDiffusion
from safe_jax.train import lora, rewards
from safe_jax.train import step as train_step
from safe_jax.train.checkpoints import Checkpointer
from safe_jax.train.config_check import validate_config
from safe_jax.train.metrics import MetricWriter, compiled_flops, device_peak_flops, finite_means, mfu

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int                       # the step reached (== config.steps unless preempted)
    status: str                     # "finished", "preempted" (SIGTERM) or "interrupted" (Ctrl-C)
    export_dir: Path | None
    metrics_path: Path
    already_finished: bool = False  # finished by an earlier call: nothing was loaded, trained or exported


def train(config: Any) -> TrainResult:
    """Run (or resume) the training ``config`` describes; see ``launch/configs/base.py``.

    A bad config raises ``SafeJaxError`` before anything is loaded (``validate_config``). A run
    whose latest checkpoint is at ``config.steps`` (and whose export is there, if enabled) returns
    at once (``already_finished``). Whatever ends the run, the checkpointer finishes its
    in-flight saves and every resource is closed; an unexpected exception carries a note naming
    the last good checkpoint.
    """
    validate_config(config)
    workdir = storage.as_path(config.workdir)  # local, or gs:// (a pod's bucket)
    export_dir = storage.as_path(config.export.dir or workdir / "export") if config.export.enabled else None
    finished = _finished_step(workdir / "checkpoints", config.steps, export_dir)
    if finished is not None:
        log.info("already finished at step %d; workdir %s", finished, workdir)
        return TrainResult(workdir, finished, "finished", export_dir, workdir / "metrics.jsonl", already_finished=True)
    try:
        with _Resources() as resources:
            state, status, step, parts = _run(config, workdir, resources)
        if status == "finished" and export_dir is not None:
            pipe, params, frozen = parts
            export(pipe, params, state, frozen, config, export_dir)
    except BaseException as e:
        steps = _checkpoint_steps(workdir / "checkpoints")
        e.add_note(f"the last good checkpoint is step {steps[-1]} in {workdir / 'checkpoints'}" if steps
                   else f"no checkpoint was saved in {workdir / 'checkpoints'}")
        raise
    return TrainResult(workdir, int(step), status, export_dir if status == "finished" else None,
                       workdir / "metrics.jsonl")


def _run(config: Any, workdir: Path, resources: "_Resources") -> tuple[Any, str, int, tuple]:
    """The run up to the last save: (state, status, step, (pipe, params, frozen)). Everything
    opened is handed to ``resources``, which closes it whatever happens."""
    source = _open_data(config)  # before the model: a wrong data name, split or folder fails in seconds
    pipe, params = _load_model(config)
    if config.sample.every:  # the sampler is built at the first sample, long after the compile: check it now
        try:
            schedulers.make_sampler(config.sample.scheduler, pipe.schedule, config.sample.steps)
        except SafeJaxError as e:
            raise SafeJaxError(f"config.sample.steps / scheduler: {e}") from e
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    step_cfg = train_step.StepConfig.from_config(config, _lora_scale(config))
    accumulate = max(int(config.optim.accumulate), 1)
    schedule = (config.optim.lr, config.optim.warmup_steps // accumulate, max(config.steps // accumulate, 1),
                config.optim.schedule)  # in optimizer updates: one per `accumulate` train steps
    tx = train_step.make_optimizer(*schedule, config.optim.weight_decay, config.optim.clip_norm or None, accumulate)
    lr_fn = train_step.lr_schedule(*schedule)
    lr_at = lambda step: float(lr_fn(step // accumulate))  # for the logs
    reward, reward_params, reward_text = load_reward(config) if step_cfg.loss != "denoising" else (None, {}, None)

    # Trainable and frozen trees, sharded FSDP-style over the mesh.
    if config.mode == "lora":
        trainable = lora.init_lora(params["unet"], jax.random.key(config.seed), rank=config.lora_rank)
    else:
        trainable = params["unet"]
    frozen = {"text_encoder": pipe.conditioner.text_params(params), "vae": params["vae"],
              "unet": params["unet"] if config.mode == "lora" else {}, "reward": reward_params}
    frozen = _put(frozen, sharding.shardings_for(frozen, mesh))
    trainable = _put(trainable, sharding.shardings_for(trainable, mesh))
    use_ema = config.optim.ema_decay is not None
    make_state = lambda p: train_step.init_state(p, tx, seed=config.seed, ema=use_ema)
    state_sh = sharding.shardings_for(jax.eval_shape(make_state, trainable), mesh)
    state = jax.jit(make_state, out_shardings=state_sh)(trainable)
    batch_size = _per_host_batch(config, mesh)
    global_batch = batch_size * jax.process_count()

    # Resume: the state restored into this run's shardings (on any mesh), the data read on from
    # the same global batch; the checkpoint's number of processes and devices does not matter.
    resolved = json.loads(config.to_json())
    ckpt = resources.add("checkpointer", Checkpointer(
        workdir / "checkpoints", keep=config.checkpoint.keep, best_metric=config.checkpoint.best_metric or None,
        best_mode=config.checkpoint.best_mode, async_save=config.checkpoint.async_save))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    sharding.wait_for_all_processes("model_loaded")  # orbax's restore starts with collectives
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, saved_config, position, at = restored
        _check_data_position(position, at, global_batch)
        _warn_config_changes(saved_config, resolved)
        log.info("resumed from %s at step %d (%d process(es), %d device(s))", ckpt.directory, at,
                 jax.process_count(), mesh.size)
    start = int(sharding.local_value(state.step))

    # The input pipeline: every process reads its own part of each global batch, from `start` on.
    length = pipe.conditioner.max_length  # the text encoder's, not a constant
    input_cfg = InputConfig(**{**config.data, "batch_size": batch_size}, seed=config.seed, max_length=length,
                            subject_weight=step_cfg.subjects.weight, subject_format=step_cfg.subjects.format,
                            micro_conditioning=pipe.is_xl)  # SDXL: each image's size and crop as time ids
    data = resources.add("data", GlobalBatches(make_iterator(input_cfg, pipe.tokenizer, source=source,
                                                             reward_text=reward_text, start=start), mesh))

    example = {"input_ids": jax.ShapeDtypeStruct((global_batch, length), jnp.int32),
               "token_weights": jax.ShapeDtypeStruct((global_batch, length), jnp.float32),
               "images": jax.ShapeDtypeStruct((global_batch, config.data.resolution, config.data.resolution, 3),
                                              jnp.float32)}
    if pipe.is_xl:
        example["time_ids"] = jax.ShapeDtypeStruct((global_batch, 6), jnp.float32)
    if reward_text is not None:  # the reward model's own tokens of each caption: fixed shapes, whatever the caption
        example.update({key: jax.ShapeDtypeStruct((global_batch, *np.shape(value)), np.asarray(value).dtype)
                        for key, value in reward_text("").items()})
    t0 = time.perf_counter()
    model = train_step.DiffusionModel.from_modules(pipe.unet, pipe.vae, pipe.schedule)
    step_fn = train_step.compile_train_step(train_step.make_train_step(model, pipe.conditioner, step_cfg, tx, reward),
                                            state, frozen, example, mesh)
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)
    sharding.wait_for_all_processes("train_step_compiled")  # the first step's collectives start together
    flops = compiled_flops(step_fn)
    peak = config.peak_tflops * 1e12 if config.peak_tflops else device_peak_flops()

    writer = resources.add("writer", MetricWriter(workdir, resume_step=start))
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        writer.text("config", "```\n" + json.dumps(resolved, indent=2) + "\n```")
    sampler = _Sampler(pipe, params, config, writer) if config.sample.every else None
    monitor = resources.add("progress", _Monitor(config, writer, tx_lr=lr_at, flops=flops, peak=peak,
                                                 images_per_step=global_batch, start=start))
    status = "finished"
    with _Preemption() as preemption:
        pending = None  # (step, metrics) of the step in flight: read after the next one is dispatched
        step = start
        while step < config.steps:
            batch = next(data)
            state, metrics = step_fn(state, frozen, batch)
            resources.in_flight = state  # waited for before anything closes, should the loop raise
            step += 1
            if pending is not None:
                monitor.record(*pending)
            pending = (step, metrics)
            stop = preemption.requested(step)
            if step % config.checkpoint.every == 0 or step == config.steps or stop:
                monitor.record(*pending)  # every step up to here is known finite (or skipped) before a save
                pending = None
                writer.flush()  # the metrics up to a checkpoint are never lost (on gs:// too)
                ckpt.save(step, state, {"batches": step, "global_batch": global_batch}, resolved,
                          monitor.interval_means())
            if sampler and (step % config.sample.every == 0 or step == config.steps):
                sampler(step, state, frozen)
            if stop:
                status = preemption.status
                log.warning("%s: saved step %d to %s; run the same command to resume", preemption.reason, step,
                            ckpt.directory)
                break
        if pending is not None:
            monitor.record(*pending)
    return state, status, step, (pipe, params, frozen)


def export(pipe: StableDiffusion, params: dict, state: train_step.TrainState, frozen: dict, config: Any,
           out_dir: Any) -> Any:
    """The trained model as a diffusers folder (LoRA merged into the UNet), plus the LoRA file.
    Every process calls it (sharded values are gathered to process 0 only, a leaf at a time);
    process 0 writes, into a local temporary folder first when ``out_dir`` is remote (gs://)."""
    trained = sharding.host_copy_to_process_0(
        state.ema if config.export.use_ema and state.ema is not None else state.params)
    base = sharding.host_copy_to_process_0(frozen["unet"]) if config.mode == "lora" else None
    if jax.process_index() == 0:
        with contextlib.ExitStack() as stack:
            local = Path(stack.enter_context(tempfile.TemporaryDirectory())) if storage.is_remote(out_dir) else out_dir
            if config.mode == "lora":
                lora.save_lora(trained, local, scale=_lora_scale(config),
                               dtype="float16" if config.export.dtype == "float16" else "float32")
                lora.export_merged(pipe, {**params, "unet": base}, trained, local, _lora_scale(config),
                                   config.export.dtype)
            else:
                pipe.save_pretrained({**params, "unet": trained}, local, dtype=config.export.dtype)
            if local != out_dir:
                storage.upload_tree(local, out_dir)
        log.info("exported to %s", out_dir)
    if jax.process_count() > 1:  # every process returns once the folder is complete
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("safe_jax_export")
    return out_dir


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------

def _check_data_position(position: dict, step: int, global_batch: int) -> None:
    """A resumed run must read the same global batches (on any number of processes and devices):
    another global batch size would put the data elsewhere, so it is refused."""
    if position.get("batches", step) != step:
        raise SafeJaxError(f"checkpoint at step {step} records a data position of {position.get('batches')} batches")
    saved = position.get("global_batch")
    if saved is not None and saved != global_batch:
        raise SafeJaxError(f"the checkpoint was trained with a global batch of {saved}, this run's is {global_batch}: "
                           f"resume with --config.data.batch_size={saved} (any mesh that holds it)")


def _open_data(config: Any) -> Any:
    """The data source ``config.data`` names; any failure to open it is bad input, named as such."""
    d = config.data
    try:
        return data_source(d.name, d.split, d.data_dir)
    except Exception as e:  # tfds raises many types for a wrong name, config, split or folder
        where = f" in {d.data_dir}" if d.data_dir else ""
        raise SafeJaxError(f"config.data.name / split / data_dir: cannot open {d.name!r} split {d.split!r}{where}: "
                           f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from e


def _load_model(config: Any) -> tuple[StableDiffusion, dict]:
    dtype = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(config.dtype, "?")
    if dtype == "?":
        raise SafeJaxError(f"train: dtype must be float32, bfloat16, float16 or empty, got {config.dtype!r}")
    return StableDiffusion.from_pretrained(config.model, dtype=dtype, attention_impl=config.attention_impl or None,
                                           remat_policy=config.remat_policy or None)


def load_reward(config: Any) -> tuple[rewards.Reward, Any, Callable[[str], dict] | None]:
    """(reward, its parameters, its text transform) as ``config.reward`` describes: an HPS v2 or
    ImageReward checkpoint file, a CLIP folder, a preset or a pixel reward. The text transform
    (caption -> the reward's own token arrays, for the input pipeline) is None for rewards that
    read the batch's SD ``input_ids``."""
    name, clip = config.reward.name, presets.resolve(config.reward.clip)
    if name in rewards.REWARD_MODELS:
        return rewards.load_reward_checkpoint(name, config.reward.checkpoint, config.reward.arch)
    kwargs = {"alpha": config.reward.alpha} if name == "dfe" else {}
    if name in rewards.CLIP_REWARDS and Path(clip).is_dir():
        return (*rewards.load_clip_reward(clip, name, **kwargs), None)
    if name in rewards.CLIP_REWARDS:
        kwargs["clip"] = clip
    reward = rewards.make_reward(name, **kwargs)
    return reward, reward.init_params(config.seed), None


def _per_host_batch(config: Any, mesh: Any) -> int:
    b, n = config.data.batch_size, jax.process_count()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % shards or b % n:
        raise SafeJaxError(f"train: the global batch ({b}) must be a multiple of the data×fsdp devices "
                           f"({shards}) and of the number of processes ({n})")
    return b // n


def _put(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) as global arrays laid out as ``shardings`` say."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def _checkpoint_steps(directory: Path) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, ascending, from the folder names
    (orbax renames a checkpoint's temporary folder to its step once it is complete)."""
    if not directory.is_dir():
        return []
    # (On an object store orbax writes the step's folder in place and marks it complete last.)
    complete = (lambda p: (p / "commit_success.txt").exists()) if storage.is_remote(directory) else (lambda p: True)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir() and complete(p))


def _finished_step(directory: Path, steps: int, export_dir: Path | None) -> int | None:
    """``steps`` when the latest checkpoint is at ``steps`` and the export (if any) was written
    after it, else None. Cheap: folder names and times only, nothing loaded or compiled."""
    found = _checkpoint_steps(directory)
    done = bool(found) and found[-1] == steps
    if done and export_dir is not None:
        index = export_dir / "model_index.json"  # save_pretrained writes it last
        done = index.is_file() and (storage.is_remote(index)  # (object stores: no folder times to compare)
                                    or index.stat().st_mtime >= (directory / str(steps)).stat().st_mtime)
    if jax.process_count() > 1:  # every process takes process 0's answer
        from jax.experimental import multihost_utils
        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    return steps if done else None


class _Resources:
    """What a run opens, closed in this order whatever ends it: the checkpointer (its in-flight
    saves finish), the input pipeline, the progress bar, the metric writer.

    When the run raises, the device work in flight (``in_flight``) is waited for first (tearing
    down under a running computation can crash the process) and an error while closing is logged,
    not raised over the first one; on a clean exit a closing error (a failed save) is raised.
    """

    ORDER = ("checkpointer", "data", "progress", "writer")

    def __init__(self):
        self._closers: dict[str, Callable[[], None]] = {}
        self.in_flight: Any = None

    def add(self, name: str, resource: Any) -> Any:
        assert name in self.ORDER, name
        self._closers[name] = resource.close
        return resource

    def __enter__(self) -> "_Resources":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.in_flight is not None:
            try:
                jax.block_until_ready(self.in_flight)
            except Exception:  # e.g. buffers donated to a step that then failed
                pass
        first = None
        for name in self.ORDER:
            close = self._closers.pop(name, None)
            if close is None:
                continue
            try:
                close()
            except Exception as e:
                if exc_type is not None or first is not None:
                    log.error("closing the %s failed too: %s: %s", name, type(e).__name__, e)
                else:
                    first = e
        if first is not None:
            raise first


def _lora_scale(config: Any) -> float:
    return lora.lora_scale(config.lora_rank, config.lora_alpha) if config.mode == "lora" else 1.0


def _warn_config_changes(saved: dict, now: dict, prefix: str = "") -> None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b and key not in ("steps", "workdir"):
            log.warning("config.%s%s changed since the checkpoint: %r → %r", prefix, key, a, b)


class _Monitor:
    """Per-step metrics: NaN policy, the progress bar, metrics.jsonl and TensorBoard."""

    def __init__(self, config: Any, writer: MetricWriter, tx_lr, flops, peak, images_per_step: int, start: int):
        from tqdm.auto import tqdm

        self.config, self.writer, self.lr, self.flops, self.peak = config, writer, tx_lr, flops, peak
        self.images_per_step = images_per_step
        self.window: list[dict] = []
        self.last_time = time.perf_counter()
        self.skipped = 0
        self.bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0)

    def record(self, step: int, metrics: dict) -> None:
        values = {k: float(sharding.local_value(v)) for k, v in metrics.items()}
        now = time.perf_counter()
        step_time, self.last_time = now - self.last_time, now
        if not values.pop("finite"):
            if self.config.nan_policy == "halt":
                raise SafeJaxError(f"train: non-finite loss or gradient at step {step} (loss {values['loss']}); "
                                   "halted before any checkpoint of it. The latest checkpoint is from before it.")
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step, self.skipped)
        values.update(lr=self.lr(step - 1), step_time=step_time, images_per_s=self.images_per_step / step_time,
                      skipped=self.skipped)
        util = mfu(self.flops, step_time, self.peak)
        if util is not None:
            values["mfu"] = util
        self.window.append(values)
        self.writer.scalars(step, values, tensorboard=step % self.config.log_every == 0)
        shown = {k: f"{values[k]:.4g}" for k in ("loss", "reward") if np.isfinite(values.get(k, np.nan))}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if step % self.config.log_every == 0:
            means = self.interval_means()
            text = " ".join(f"{k}={v:.4g}" for k, v in means.items() if k not in ("skipped",))
            self.bar.write(f"step {step}: {text}")
            self.window = self.window[-1:]

    def interval_means(self) -> dict:
        """Means over the steps since the last log line (NaNs, e.g. ReFL metrics on denoising steps, left out)."""
        return finite_means(self.window)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()


class _Sampler:
    """Sample grids during training: each prompt without and with subject weighting."""

    def __init__(self, pipe: StableDiffusion, params: dict, config: Any, writer: MetricWriter):
        from safe_jax.text.subjects import extract

        self.pipe, self.params, self.config, self.writer = pipe, params, config, writer
        self.prompts = list(config.sample.prompts)
        self.subjects = extract(self.prompts, backend="offline", progress=False)
        self.dir = storage.as_path(config.workdir) / "samples"

    def __call__(self, step: int, state: train_step.TrainState, frozen: dict) -> None:
        trained = sharding.host_copy_to_process_0(state.params)
        base = sharding.host_copy_to_process_0(frozen["unet"]) if self.config.mode == "lora" else None
        if jax.process_index() != 0:
            return
        unet = trained if self.config.mode != "lora" else jax.tree.map(
            np.asarray, lora.merge(base, trained, _lora_scale(self.config)))
        params = {**self.params, "unet": unet}
        s = self.config.sample
        kw = dict(num_steps=s.steps, guidance_scale=s.guidance, scheduler=s.scheduler, seed=self.config.seed)
        plain = self.pipe.generate(params, self.prompts, **kw)
        subjects = self.config.subjects
        weighted = self.pipe.generate(params, self.prompts, subjects=self.subjects, subject_weight=subjects.weight,
                                      weighting=subjects.weighting, subject_format=subjects.format, **kw)
        grid = np.concatenate([np.concatenate(list(plain), 1), np.concatenate(list(weighted), 1)], 0)
        self.dir.mkdir(parents=True, exist_ok=True)
        from PIL import Image
        with (self.dir / f"step_{step:07d}.png").open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
        self.writer.image(step, "samples/top_plain_bottom_subject_weighted", grid)


class _Preemption:
    """SIGTERM or Ctrl-C (SIGINT) → save and stop. One process: our own handlers (a second
    Ctrl-C stops at once, without the save). Several: JAX's preemption sync point, so that every
    process stops after the same step."""

    def __init__(self):
        self._flag = False
        self._previous: dict[int, Any] = {}
        self.status, self.reason = "preempted", "preempted"

    def __enter__(self) -> "_Preemption":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self._flag = True
        if signum == signal.SIGINT:
            self.status, self.reason = "interrupted", "interrupted (Ctrl-C)"
            log.warning("Ctrl-C: saving after this step, then stopping (Ctrl-C again stops at once, without saving)")
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the distributed runtime runs without a preemption service
            return False

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(signum, previous)
        self._previous = {}
