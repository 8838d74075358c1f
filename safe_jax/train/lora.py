"""LoRA on the UNet's attention projections, as a separate trainable tree.

The model is not edited: the LoRA factors live in their own tree, and ``merge`` returns
``W + scale · A @ B`` for every targeted kernel. It is a pure function, so a train step calls
``unet.apply({"params": merge(frozen, lora, scale)}, ...)`` inside ``jit`` and differentiates
with respect to ``lora`` only; the frozen weights need no gradient or optimizer state.

Tree layout: the UNet's module paths, each targeted module holding ``lora_A`` [in, r] and
``lora_B`` [r, out] (Flax's kernel layout, [in, out]; PEFT stores the transposes)::

    {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"to_q":
        {"lora_A": [320, 4], "lora_B": [4, 320]}, ...}}}}}

Initialisation follows PEFT: A ~ U(±1/√in) (kaiming-uniform, a=√5), B = 0, so the merged
model starts equal to the base. ``scale`` is ``alpha / rank`` (``lora_scale``).

Export: ``save_lora`` writes ``pytorch_lora_weights.safetensors`` with PEFT keys
(``unet.<module>.lora_A.weight`` [r, in], ``unet.<module>.lora_B.weight`` [out, r]) that
``diffusers.StableDiffusionPipeline.load_lora_weights`` reads (it needs ``peft`` installed).
The file carries no alpha: diffusers then takes alpha = rank (scale 1), so the scale is folded
into ``lora_B``. ``export_merged`` writes a full diffusers folder with the LoRA merged in.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from safe_jax.errors import SafeJaxError
from safe_jax.io.convert import torch_key
from safe_jax.sharding import host_copy

# Attention q/k/v/out projections of every transformer block (self- and cross-attention): the
# targets of the SAFE authors' recipe and of diffusers' train_text_to_image_lora.py.
DEFAULT_TARGETS = r"(^|/)attn[12]/(to_q|to_k|to_v|to_out_0)$"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

Params = dict[str, Any]


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    tree = tree.unfreeze() if hasattr(tree, "unfreeze") else tree
    return traverse_util.flatten_dict(dict(tree))


def target_modules(unet_params: Mapping[str, Any], targets: str = DEFAULT_TARGETS) -> list[tuple[str, ...]]:
    """Paths of the dense layers (2-D ``kernel``) whose '/'-joined module path matches ``targets``."""
    return [path[:-1] for path, leaf in _flat(unet_params).items()
            if path[-1] == "kernel" and len(leaf.shape) == 2 and re.search(targets, "/".join(path[:-1]))]


def init_lora(unet_params: Mapping[str, Any], key: jax.Array, rank: int = 4, targets: str = DEFAULT_TARGETS,
              dtype: Any = jnp.float32) -> Params:
    """LoRA factors for every targeted kernel: A ~ U(±1/√in), B = 0 (the model is unchanged).

    Only shapes are read, so ``unet_params`` may be abstract (``jax.eval_shape`` output).
    """
    if rank < 1:
        raise SafeJaxError(f"LoRA rank must be at least 1, got {rank}")
    modules = target_modules(unet_params, targets)
    if not modules:
        raise SafeJaxError(f"LoRA targets {targets!r} match no dense kernel of the UNet")
    flat_params = _flat(unet_params)
    shapes = tuple(tuple(flat_params[mod + ("kernel",)].shape) for mod in modules)
    factors = _draw_factors(key, shapes, rank, jnp.dtype(dtype))
    out = {}
    for mod, (a, b) in zip(modules, factors):
        out[mod + ("lora_A",)], out[mod + ("lora_B",)] = a, b
    return traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # one compilation, not one per shape and op
def _draw_factors(key: jax.Array, shapes: tuple[tuple[int, int], ...], rank: int, dtype: Any) -> list:
    out = []
    for (d_in, d_out), k in zip(shapes, jax.random.split(key, len(shapes))):
        bound = 1.0 / np.sqrt(d_in)
        out.append((jax.random.uniform(k, (d_in, rank), dtype, -bound, bound), jnp.zeros((rank, d_out), dtype)))
    return out


def lora_scale(rank: int, alpha: float | None = None) -> float:
    """alpha / rank, the factor on A @ B; alpha=None means alpha = rank (scale 1, diffusers' default)."""
    return 1.0 if alpha is None else float(alpha) / rank


def lora_rank(lora_params: Mapping[str, Any]) -> int:
    """The rank of a LoRA tree (one rank for all modules)."""
    ranks = {leaf.shape[-1] for path, leaf in _flat(lora_params).items() if path[-1] == "lora_A"}
    if len(ranks) != 1:
        raise SafeJaxError(f"LoRA tree has ranks {sorted(ranks)}: expected exactly one")
    return ranks.pop()


def _pairs(lora_params: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[Any, Any]]:
    flat = _flat(lora_params)
    mods = {path[:-1] for path in flat}
    bad = [p for p in flat if p[-1] not in ("lora_A", "lora_B")]
    if bad:
        raise SafeJaxError(f"not a LoRA tree: leaf {'/'.join(bad[0])} (leaves must be lora_A / lora_B)")
    try:
        return {m: (flat[m + ("lora_A",)], flat[m + ("lora_B",)]) for m in mods}
    except KeyError as e:
        raise SafeJaxError(f"LoRA tree: {'/'.join(e.args[0])} is missing") from None


def merge(unet_params: Mapping[str, Any], lora_params: Mapping[str, Any], scale: float | jax.Array = 1.0) -> Params:
    """UNet parameters with ``W + scale · A @ B`` in every LoRA-targeted kernel.

    Pure and traceable: call it inside ``jit``/``grad``. The product is formed in fp32 at full
    precision and cast back to the kernel's dtype; untouched leaves are passed through.
    """
    flat = _flat(unet_params)
    for mod, (a, b) in _pairs(lora_params).items():
        path = mod + ("kernel",)
        if path not in flat:
            raise SafeJaxError(f"LoRA module {'/'.join(mod)} has no kernel in the UNet parameters")
        w = flat[path]
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        if delta.shape != w.shape:
            raise SafeJaxError(f"LoRA {'/'.join(mod)}: A @ B has shape {delta.shape}, the kernel {w.shape}")
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


_merge_jit = jax.jit(merge)


def num_params(tree: Any) -> int:
    """Element count of a tree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------- diffusers I/O
def _module_name(mod: tuple[str, ...]) -> str:
    return torch_key(mod + ("kernel",))[: -len(".weight")]


def _module_path(name: str) -> tuple[str, ...]:
    """'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0' -> Flax module path."""
    parts: list[str] = []
    for part in name.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def to_diffusers_lora_state_dict(lora_params: Mapping[str, Any], scale: float = 1.0,
                                 prefix: str = "unet") -> dict[str, np.ndarray]:
    """PEFT-format state dict for diffusers' ``load_lora_weights`` (fp32 numpy).

    ``{prefix}.<torch module>.lora_A.weight`` is Aᵀ [r, in]; ``.lora_B.weight`` is (scale·B)ᵀ
    [out, r], the scale folded in because diffusers assumes alpha = rank without metadata.
    """
    out = {}
    for mod, (a, b) in sorted(_pairs(lora_params).items()):
        name = f"{prefix}.{_module_name(mod)}" if prefix else _module_name(mod)
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(host_copy(a).astype(np.float32).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray((host_copy(b).astype(np.float32) * scale).T)
    return out


def from_diffusers_lora_state_dict(state_dict: Mapping[str, Any], prefix: str = "unet") -> Params:
    """The inverse of ``to_diffusers_lora_state_dict`` (scale 1: any alpha is already in B).

    Keys of other components (e.g. ``text_encoder.``) are ignored; anything else that is not a
    PEFT ``lora_A`` / ``lora_B`` weight is an error.
    """
    flat = {}
    pre = f"{prefix}." if prefix else ""
    for key, value in state_dict.items():
        if prefix and not key.startswith(pre):
            if key.split(".", 1)[0] in ("text_encoder", "text_encoder_2"):
                continue
            raise SafeJaxError(f"LoRA state dict: key {key!r} does not start with {pre!r}")
        m = re.fullmatch(r"(?P<module>.+)\.(?P<which>lora_[AB])\.weight", key[len(pre):])
        if not m:
            raise SafeJaxError(f"LoRA state dict: {key!r} is not a PEFT lora_A/lora_B weight "
                               "(kohya/A1111 formats are not supported)")
        flat[_module_path(m["module"]) + (m["which"],)] = jnp.asarray(np.asarray(value).T)
    if not flat:
        raise SafeJaxError(f"LoRA state dict has no {pre!r} weights")
    tree = traverse_util.unflatten_dict(flat)
    _pairs(tree)  # every module has both factors
    return tree


def save_lora(lora_params: Mapping[str, Any], path: str | Path, scale: float = 1.0,
              dtype: str = "float32") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (into ``path`` if it is a folder name).

    ``pipe.load_lora_weights(folder)`` in diffusers loads it. On several hosts call it on every
    process (sharded factors are gathered); process 0 writes.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "float16"):
        raise SafeJaxError(f"LoRA export dtype must be float32 or float16, not {dtype!r}")
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME
    state = {k: v.astype(dtype) for k, v in to_diffusers_lora_state_dict(lora_params, scale).items()}
    if jax.process_index() == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(file), metadata={"format": "pt"})
    return file


def load_lora(path: str | Path) -> Params:
    """Read a PEFT-format LoRA safetensors file (ours or diffusers') into a LoRA tree (scale 1)."""
    from safetensors.numpy import load_file

    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise SafeJaxError(f"missing file: {file}")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise SafeJaxError(f"{file}: not a readable safetensors file ({e})") from None
    return from_diffusers_lora_state_dict({k: v.astype(np.float32) for k, v in state.items()})


def export_merged(pipe: Any, params: Params, lora_params: Mapping[str, Any], out_dir: str | Path,
                  scale: float = 1.0, dtype: str = "float32") -> Path:
    """A full diffusers folder with the LoRA merged into the UNet (no peft needed to load it)."""
    merged = _merge_jit(params["unet"], lora_params, scale)
    return pipe.save_pretrained({**params, "unet": merged}, out_dir, dtype=dtype)
