"""Mechanical mapping between our Flax parameter trees and PyTorch state dicts.

Our modules are named after the diffusers/transformers attributes, so a Flax path maps to a
PyTorch key by a fixed rule: list entries Flax names ``resnets_0`` are ``resnets.0`` in PyTorch,
and a leaf's name and layout follow its kind (``kernel`` of a conv or dense layer, norm ``scale``,
``embedding``). The mapping is total in both directions: every tensor has exactly one partner,
and anything left over on either side is an error, never silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from safe_jax.errors import SafeJaxError

# Attributes that are nn.ModuleList / nn.Sequential in PyTorch: their Flax names end in _<index>.
LIST_MODULES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
     "downsamplers", "upsamplers", "to_out", "net", "layers"}
)
_LIST_ENTRY = re.compile(r"^(?P<name>[a-z_]+)_(?P<index>\d+)$")


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax parameter path."""
    parts = []
    for part in path[:-1]:
        m = _LIST_ENTRY.match(part)
        if m and m["name"] in LIST_MODULES:
            parts += [m["name"], m["index"]]
        else:
            parts.append(part)
    leaf = path[-1]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv HWIO -> OIHW
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:  # dense (in, out) -> (out, in)
        return np.ascontiguousarray(value.T)
    return value


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # OIHW -> HWIO
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if leaf == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax parameter tree -> PyTorch-layout numpy state dict (bitwise: only transposes)."""
    out = {}
    for path, value in traverse_util.flatten_dict(_unfreeze(params)).items():
        out[torch_key(path)] = to_torch_layout(path[-1], np.asarray(jax.device_get(value)))
    return out


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping[str, Any],
    *,
    what: str = "model",
    dtype: Any = None,
) -> dict[str, Any]:
    """PyTorch-layout numpy state dict -> Flax tree shaped like ``abstract_params``.

    ``abstract_params`` is the tree of ``jax.ShapeDtypeStruct`` from ``jax.eval_shape(model.init, ...)``.
    Raises SafeJaxError naming the first missing, unexpected or mis-shaped tensor.
    """
    flat_abstract = traverse_util.flatten_dict(_unfreeze(abstract_params))
    wanted = {torch_key(path): path for path in flat_abstract}
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SafeJaxError(
            f"{what}: weights do not match the architecture in its config: {'; '.join(lines)}"
        )
    flat = {}
    for key, path in wanted.items():
        value = to_flax_layout(path[-1], np.asarray(state_dict[key]))
        expected = tuple(flat_abstract[path].shape)
        if value.shape != expected:
            raise SafeJaxError(
                f"{what}: parameter '{key}' has shape {tuple(state_dict[key].shape)} in the checkpoint "
                f"but the config needs {tuple(to_torch_layout(path[-1], np.empty(expected, np.uint8)).shape)}"
            )
        target = dtype or flat_abstract[path].dtype
        flat[path] = value.astype(target, copy=False)
    return traverse_util.unflatten_dict(flat)


def _unfreeze(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)
