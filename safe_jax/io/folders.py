"""Reading and writing diffusers/transformers checkpoint folders, with one clear line per failure.

Weights are read with safetensors; a ``.bin`` is read only through ``torch.load(weights_only=True)``,
which refuses pickled code. Nothing here ever downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from safe_jax.errors import SafeJaxError
from safe_jax.io import atomic

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SafeJaxError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafeJaxError(f"invalid JSON in {path}: {e}") from None


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The files holding a component's weights: safetensors first, sharded or not, then .bin."""
    suffix = f".{variant}" if variant else ""
    for stem in WEIGHT_NAMES:
        single = folder / f"{stem}{suffix}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors{suffix and '.' + variant}.index.json"
        index = index if index.is_file() else folder / f"{stem}{suffix}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise SafeJaxError(f"empty weight_map in {index}")
            return [folder / s for s in shards]
    for stem in WEIGHT_NAMES:
        name = "pytorch_model" if stem == "model" else stem
        single = folder / f"{name}{suffix}.bin"
        if single.is_file():
            return [single]
    raise SafeJaxError(
        f"no weights in {folder}: expected diffusion_pytorch_model.safetensors or model.safetensors"
        + (f" (variant {variant!r})" if variant else "")
    )


def load_state_dict(folder: Path, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of one component folder as numpy arrays keyed by their PyTorch names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SafeJaxError(f"missing folder: {folder}")
    state: dict[str, np.ndarray] = {}
    for path in _weight_files(folder, variant):
        if not path.is_file():
            raise SafeJaxError(f"missing weight shard: {path}")
        state.update(_load_bin(path) if path.suffix == ".bin" else _load_safetensors(path))
    return state


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SafeJaxError(f"corrupt safetensors file {path}: {e}") from None


def _load_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise SafeJaxError(f"{path} is a PyTorch .bin file: install torch to read it, or convert it to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        raise SafeJaxError(f"cannot read {path} safely (weights_only=True): {str(e).splitlines()[0]}") from None
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def save_state_dict(state: Mapping[str, np.ndarray], path: Path, dtype: str = "float32") -> None:
    """Write a safetensors file atomically, so an interrupted export never leaves a truncated file."""
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}[dtype]
    if np_dtype == "bfloat16":
        import ml_dtypes
        np_dtype = ml_dtypes.bfloat16
    cast = lambda v: v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v
    # reshape: ascontiguousarray makes 0-d tensors (e.g. CLIP's logit_scale) 1-d.
    tensors = {k: np.ascontiguousarray(cast(v)).reshape(v.shape) for k, v in state.items()}
    with atomic.replacing(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
