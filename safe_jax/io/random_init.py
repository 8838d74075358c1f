"""Random weights drawn on the host from an abstract parameter tree: one initialisation for every
model we build without a checkpoint (the SD presets, the tiny CLIP rewards).

Not ``model.init``: that traces and compiles the forward pass of every model (tens of seconds on
a CPU even for ``tiny``). Kernels are LeCun-normal, embeddings N(0, 0.02²), norms identity,
biases zero: a sane untrained network, not a reproduction of Flax's or PyTorch's init.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def random_params(abstract: Any, seed: int = 0, constants: Mapping[str, float] | None = None) -> Any:
    """A tree shaped like ``abstract`` (``jax.ShapeDtypeStruct`` leaves); ``constants`` fills the
    leaves of those names with a value (e.g. CLIP's ``logit_scale``)."""
    rng = np.random.default_rng(seed)
    constants = dict(constants or {})

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in constants:
            x = np.full(shape, constants[name], np.float32)
        elif name == "kernel":
            x = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("embedding", "class_embedding"):
            x = 0.02 * rng.standard_normal(shape, np.float32)
        elif name == "scale":
            x = np.ones(shape, np.float32)
        else:
            x = np.zeros(shape, np.float32)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)
