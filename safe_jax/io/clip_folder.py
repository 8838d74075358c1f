"""transformers ``CLIPModel`` folders (reward and metric models) read into and written from our
Flax CLIP: config.json + safetensors (or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``),
and random weights for a CLIP built without a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from safe_jax.errors import SafeJaxError
from safe_jax.io import atomic, folders, presets
from safe_jax.io.random_init import random_params
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.clip_vision import CLIPConfig, CLIPModel, abstract_params, from_hf_state_dict, to_hf_state_dict


def init_params(model: CLIPModel, seed: int = 0) -> dict[str, Any]:
    """Random weights for ``model`` (``random_init``), the logit scale at its initial value."""
    return random_params(abstract_params(model), seed, {"logit_scale": model.config.logit_scale_init_value})


def load_clip(folder: str | Path, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              attention_impl: AttentionImpl = None, remat_policy: str | None = None
              ) -> tuple[CLIPModel, dict[str, Any]]:
    """A transformers ``CLIPModel`` folder (config.json + model.safetensors, sharded safetensors
    or pytorch_model.bin, read with ``torch.load(weights_only=True)``) as (module, params); or a
    shipped preset's name (``tiny-anchor-reward``, ``tiny-anchor-judge``)."""
    folder = Path(presets.resolve(folder))
    if not folder.is_dir():
        raise SafeJaxError(f"CLIP model folder {folder} does not exist")
    config = CLIPConfig.from_hf(folders.read_json(folder / "config.json"), str(folder / "config.json"))
    model = CLIPModel(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                      remat_policy=remat_policy)
    state = folders.load_state_dict(folder)
    return model, from_hf_state_dict(state, model, dtype=param_dtype)


def save_clip(model: CLIPModel, params: Mapping[str, Any], folder: str | Path, *, dtype: str = "float32") -> Path:
    """Write config.json + model.safetensors that ``transformers.CLIPModel.from_pretrained`` loads."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise SafeJaxError(f"save_clip: dtype must be float32, float16 or bfloat16, got {dtype!r}")
    target = jnp.dtype(dtype)  # ml_dtypes' bfloat16 for "bfloat16"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folders.write_json(folder / "config.json", model.config.to_hf())
    # Not folders.save_state_dict: np.ascontiguousarray there makes the 0-d logit_scale [1].
    tensors = {key: np.array(value, dtype=target, order="C") for key, value in to_hf_state_dict(params).items()}
    with atomic.replacing(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return folder
