"""Training checkpoints: train state, data position and resolved config, saved together by orbax.

A checkpoint holds everything a restart needs to continue bit for bit: the ``TrainState`` (params,
optimizer state, EMA, step, RNG key), the data position and the config the run was resolved to.
The data position is global, not per host: the input pipeline is a pure function of the global
batch index (``make_dataset(start=…)``), so the record says how many global batches of what size
were read, and a run restored on another number of processes or devices reads on from there. Saves are asynchronous (the device→host copy blocks, the writing does
not); orbax writes into a temporary folder and renames it when complete, so a crash mid-save leaves
the previous checkpoint as the latest. Kept: the last ``keep`` checkpoints plus the best by a
metric. A latest checkpoint that cannot be read is moved aside (not deleted) and the one before it
is used, with a warning; when none can be read, a warning says the run starts over from step 0.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from safe_jax.errors import SafeJaxError
from safe_jax.io import storage
from safe_jax.sharding import local_value

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value in ``tree`` is finite (one device reduction)."""
    return bool(local_value(_all_finite(tree)))


class Checkpointer:
    """An orbax ``CheckpointManager`` for SAFE runs.

    ``best_metric`` names a key of the ``metrics`` passed to ``save`` (``best_mode`` "min" or
    "max"); that checkpoint is kept besides the last ``keep``. Call every method on every process.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, best_metric: str | None = "loss",
                 best_mode: str = "min", async_save: bool = True):
        if keep < 1:
            raise SafeJaxError(f"checkpoint: keep must be ≥ 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise SafeJaxError(f"checkpoint: best_mode must be min or max, got {best_mode!r}")
        # gs://… (any epath URL) as is: orbax writes there through tensorstore and epath; on an
        # object store the renames below are copies and deletes.
        self.directory = storage.as_path(directory)
        if not storage.is_remote(self.directory):
            self.directory = self.directory.absolute()
        self.best_metric = best_metric
        keep_policies = [policies.LatestN(keep)]
        if best_metric:
            keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                                n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, CONFIG))

    @property
    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data: dict, config: dict, metrics: dict | None = None) -> None:
        """Start an asynchronous save; a state holding NaN or Inf is refused (nothing is written).
        ``data`` is the JSON data position (``{"batches": …, "global_batch": …}`` in training)."""
        if not all_finite(state):
            raise SafeJaxError(f"checkpoint: the train state at step {step} holds NaN or Inf; not saved")
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.best_metric and not jnp.isfinite(metrics.get(self.best_metric, float("nan"))):
            metrics.pop(self.best_metric, None)  # a non-finite score must not win "best"
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                     DATA: ocp.args.JsonSave(data),
                                     CONFIG: ocp.args.JsonSave(config)})
        self._manager.save(step, args=args, metrics=metrics or None, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, dict, int] | None:
        """(state, config, data position, step) from the newest readable checkpoint, or None when
        there is none.

        ``abstract_state`` gives shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves):
        orbax restores into them whatever mesh the checkpoint was written from (an elastic restart).
        """
        self.wait()
        set_aside = []
        for step in sorted(self.steps, reverse=True):
            args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                         DATA: ocp.args.JsonRestore(),
                                         CONFIG: ocp.args.JsonRestore()})
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
                set_aside.append(self._set_aside(step, e))
                continue
            return restored[STATE], dict(restored[CONFIG] or {}), dict(restored[DATA] or {}), step
        if set_aside:
            log.warning("every checkpoint in %s is unreadable (moved aside to %s): starting over from step 0",
                        self.directory, ", ".join(p.name for p in set_aside))
        return None

    def _set_aside(self, step: int, error: Exception) -> Path:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        aside = self.directory / f"unreadable-{step}-{int(time.time())}"
        log.warning("checkpoint %d in %s cannot be read (%s); moved to %s, trying the one before",
                    step, self.directory, reason, aside.name)
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        return aside

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
