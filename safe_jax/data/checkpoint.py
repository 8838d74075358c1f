"""The input iterator's state in orbax checkpoints, next to the train state, for exact resume.

grain registers ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` with orbax's args API;
each process writes its own small JSON file (``process_<i>-of-<n>.json``), so a multi-host run
saves and restores every host's position. Usage with a CheckpointManager::

    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=save_args(train_state, data_iter))
    ...
    restored = mngr.restore(step, args=restore_args(abstract_train_state, data_iter))
    train_state = restored["state"]          # data_iter is now where it was at ``step``
"""

from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


def save_args(train_state: Any, data_iterator: Any) -> ocp.args.Composite:
    """Composite args saving the train state (``StandardSave``) and the iterator position together."""
    return ocp.args.Composite(**{STATE: ocp.args.StandardSave(train_state),
                                 DATA: grain.checkpoint.CheckpointSave(data_iterator)})


def restore_args(abstract_train_state: Any, data_iterator: Any) -> ocp.args.Composite:
    """Composite args restoring both; ``data_iterator`` (a fresh one, same config) is set in place."""
    return ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_train_state),
                                 DATA: grain.checkpoint.CheckpointRestore(data_iterator)})
