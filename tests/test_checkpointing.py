"""The Checkpointer on its own: state + data position + config round trip, keep-K and best,
fallback from an unreadable latest checkpoint, and refusal to save NaN."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from safe_jax.errors import SafeJaxError
from safe_jax.train.checkpoints import Checkpointer


def _position(step: int = 0) -> dict:
    return {"batches": step, "global_batch": 16}


def _state(step: int):
    return {"step": jnp.asarray(step, jnp.int32), "w": jnp.full((4, 3), float(step)), "opt": {"mu": jnp.arange(5.0) * step}}


def test_round_trip_keeps_last_k_and_best(tmp_path):
    with Checkpointer(tmp_path, keep=2, best_metric="loss", async_save=True) as ckpt:
        for step, loss in [(1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9), (5, 0.8)]:
            ckpt.save(step, _state(step), _position(step), {"lr": 1e-4, "step": step}, {"loss": loss})
        ckpt.wait()
        assert ckpt.steps == [2, 4, 5]  # last two, and the best loss (step 2)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        state, config, position, step = ckpt.restore_latest(_state(0))
    assert step == 5 and config == {"lr": 1e-4, "step": 5}
    assert int(state["step"]) == 5 and np.array_equal(state["w"], np.full((4, 3), 5.0))
    assert position == _position(5)  # where the data reads on


def test_unreadable_latest_falls_back_with_a_warning(tmp_path, caplog):
    with Checkpointer(tmp_path, keep=3, best_metric=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), _position(step), {"step": step})
    damaged = [f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file() and f.stat().st_size > 0]
    assert damaged
    for f in damaged:
        f.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="safe_jax.train.checkpoints"), Checkpointer(tmp_path) as ckpt:
        state, config, position, step = ckpt.restore_latest(_state(0))
        assert step == 1 and ckpt.steps == [1]
    assert int(state["step"]) == 1 and position == _position(1) and config["step"] == 1
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    assert [p.name.split("-")[:2] for p in tmp_path.glob("unreadable-*")] == [["unreadable", "2"]]  # kept aside


def test_no_checkpoint_means_none(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(_state(0)) is None


def test_a_state_holding_nan_is_never_saved(tmp_path):
    bad = dict(_state(1), w=jnp.full((4, 3), jnp.nan))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(SafeJaxError, match="NaN or Inf"):
            ckpt.save(1, bad, _position(1), {})
        ckpt.wait()
        assert ckpt.steps == []


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SafeJaxError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(SafeJaxError, match="best_mode"):
        Checkpointer(tmp_path, best_mode="lowest")
