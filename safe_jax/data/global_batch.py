"""Host batches → global ``jax.Array`` batches laid out on the training mesh's data axes.

Each process feeds only its own rows (``jax.make_array_from_process_local_data``); the global batch
is the concatenation over processes in process order, sharded over the mesh's data axes and
replicated over the others (model axes). Strings (``image_id``) cannot live on a device: they stay
with the host iterator.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from safe_jax import sharding as shd
from safe_jax.data.transforms import to_unit_range


def data_sharding(mesh: Mesh, data_axes: str | Sequence[str] | None = None) -> NamedSharding:
    """The batch dimension over the mesh's data axes, the rest replicated. By default the axes the
    logical rules give the batch (``sharding.batch_sharding``: data × fsdp on the training mesh);
    ``data_axes`` names them for other meshes (one name or several)."""
    if data_axes is None:
        return shd.batch_sharding(mesh)
    axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"mesh axes {mesh.axis_names} lack the data axes {missing}")
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))


def global_batch(batch: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """The numeric arrays of a host batch as global arrays (leading dim × number of processes)."""
    numeric = {key: np.asarray(value) for key, value in batch.items()}
    numeric = {k: v for k, v in numeric.items() if v.dtype.kind in "biuf" or v.dtype.name == "bfloat16"}
    return shd.shard_batch(numeric, sharding.mesh, sharding)


class GlobalBatches:
    """An iterator of global batches over a grain iterator of host batches; checkpointable.

    uint8 images (the pipeline's default: 4× less to move between processes and to the device) are
    scaled to float32 [-1, 1] on the devices, where it costs nothing that matters.
    It keeps no batch of its own in flight, so its state is exactly the host iterator's, and it can
    go straight into orbax with ``grain.checkpoint.CheckpointSave(it)`` (``safe_jax.train.checkpoints``
    saves it so, beside the train state).
    Use it as a context manager (or call ``close``) so that worker processes stop cleanly.
    """

    def __init__(self, host_iterator: Any, mesh: Mesh, data_axes: str | Sequence[str] | None = None,
                 scale_images: bool = True):
        self.host = host_iterator
        self.sharding = data_sharding(mesh, data_axes)
        self.scale_images = scale_images
        self._scale = jax.jit(to_unit_range, out_shardings=self.sharding)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = global_batch(next(self.host), self.sharding)
        if self.scale_images and "images" in batch and batch["images"].dtype == jnp.uint8:
            batch["images"] = self._scale(batch["images"])
        return batch

    # The grain CheckpointHandler protocol for non-DatasetIterator items: bytes in, bytes out.
    def get_state(self) -> bytes:
        state = self.host.get_state()
        return state if isinstance(state, bytes) else json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        if isinstance(self.host, grain.DatasetIterator):  # dict state; a DataLoaderIterator takes the bytes
            state = json.loads(state)
        self.host.set_state(state)

    def start_prefetch(self) -> None:
        start = getattr(self.host, "start_prefetch", None)
        if start is not None:
            start()

    def close(self) -> None:
        close = getattr(self.host, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "GlobalBatches":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
