"""OpenCLIP checkpoints (HPS v2 / v2.1 and other ``open_clip.CLIP`` ViTs) as our Flax ``CLIPModel``.

OpenCLIP and transformers compute the same network for a plain CLIP ViT (pre-norm residual
blocks, CLS-token pooling, text pooled at the largest token id, bias-free projections), but name
and lay out the tensors differently. Converting the state dict once, into the transformers layout
that ``safe_jax.models.clip_vision`` already loads, keeps one model implementation for every CLIP
reward; the mapping is explicit and total, so a checkpoint with a feature this model lacks (layer
scale, attentional pooling, a projection bias, ...) is refused by name rather than half-loaded:

    visual.conv1.weight                        vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                     vision_model.embeddings.class_embedding
    visual.positional_embedding                vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post             vision_model.pre_layrnorm / .post_layernorm
    visual.proj [width, embed]                 visual_projection.weight (transposed)
    token_embedding.weight                     text_model.embeddings.token_embedding.weight
    positional_embedding                       text_model.embeddings.position_embedding.weight
    ln_final                                   text_model.final_layer_norm
    text_projection [width, embed]             text_projection.weight (transposed)
    logit_scale                                logit_scale
    (visual.)transformer.resblocks.N.
        ln_1 / ln_2                            (vision_model|text_model).encoder.layers.N.layer_norm1 / 2
        attn.in_proj_weight / _bias            self_attn.{q,k,v}_proj (split in thirds, q first)
        attn.out_proj                          self_attn.out_proj
        mlp.c_fc / mlp.c_proj                  mlp.fc1 / mlp.fc2
    attn_mask                                  dropped: the causal mask, a buffer (older releases saved it)

Every width, depth, size and the vocabulary come from the tensor shapes. Three things do not: the
number of attention heads of each tower and the activation (GELU, or QuickGELU for OpenAI's
weights). They come from ``model_name`` (one of ``OPEN_CLIP_ARCHS``, the values of OpenCLIP's
``model_configs/<name>.json``), or explicitly from ``vision_heads`` / ``text_heads`` /
``quick_gelu`` (which override the named model's). A named model's widths must match the
checkpoint's, so weights of one size are never read as another.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.clip_text import CLIPTextConfig
from safe_jax.models.clip_vision import CLIPConfig, CLIPModel, CLIPVisionConfig, from_hf_state_dict


@dataclass(frozen=True)
class OpenCLIPArch:
    """What an OpenCLIP model config fixes that its state dict does not show."""

    vision_width: int
    vision_head_width: int
    text_width: int
    text_heads: int
    quick_gelu: bool = False

    @property
    def vision_heads(self) -> int:
        return self.vision_width // self.vision_head_width


# OpenCLIP's model_configs (vision head_width defaults to 64 where the JSON omits it).
OPEN_CLIP_ARCHS: dict[str, OpenCLIPArch] = {
    "ViT-B-32": OpenCLIPArch(768, 64, 512, 8),
    "ViT-B-16": OpenCLIPArch(768, 64, 512, 8),
    "ViT-L-14": OpenCLIPArch(1024, 64, 768, 12),
    "ViT-H-14": OpenCLIPArch(1280, 80, 1024, 16),  # HPS v2 / v2.1, PickScore's base
    "ViT-g-14": OpenCLIPArch(1408, 88, 1024, 16),
    "ViT-bigG-14": OpenCLIPArch(1664, 104, 1280, 20),
}
for _name in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):  # OpenAI's weights: the same shapes, QuickGELU
    OPEN_CLIP_ARCHS[f"{_name}-quickgelu"] = dataclasses.replace(OPEN_CLIP_ARCHS[_name], quick_gelu=True)

_LAYER = re.compile(r"^(?P<tower>visual\.)?transformer\.resblocks\.(?P<index>\d+)\.(?P<rest>.+)$")
_LAYER_TENSORS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.in_proj_weight": None, "attn.in_proj_bias": None,  # split into q/k/v
}
_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = ("visual.proj", "text_projection")  # x @ proj in OpenCLIP, a Linear's weight in ours
_BUFFERS = ("attn_mask",)
# Read to infer the architecture, so they are checked first.
_SHAPE_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
               "positional_embedding", "text_projection")


def _shape(state: Mapping[str, Any], key: str, ndim: int, source: str) -> tuple[int, ...]:
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise SafeJaxError(f"{source}: '{key}' has shape {shape}, an OpenCLIP ViT has a {ndim}-d tensor there")
    return shape


def _depth(state: Mapping[str, Any], tower: str) -> int:
    indices = {int(m["index"]) for m in map(_LAYER.match, state) if m and (m["tower"] or "") == tower}
    return max(indices) + 1 if indices else 0


def infer_config(state: Mapping[str, Any], model_name: str | None = "ViT-H-14", *, vision_heads: int | None = None,
                 text_heads: int | None = None, quick_gelu: bool | None = None,
                 source: str = "open_clip state dict") -> CLIPConfig:
    """Our ``CLIPConfig`` for an OpenCLIP state dict: sizes from its shapes, heads and activation
    from ``model_name`` and/or the explicit arguments (see the module docstring)."""
    arch = None
    if model_name is not None:
        if model_name not in OPEN_CLIP_ARCHS:
            raise SafeJaxError(f"{source}: unknown OpenCLIP model '{model_name}' (known: {', '.join(OPEN_CLIP_ARCHS)};"
                               " or pass model_name=None with vision_heads and text_heads)")
        arch = OPEN_CLIP_ARCHS[model_name]
    for key in _SHAPE_KEYS:
        if key not in state:
            raise SafeJaxError(f"{source}: missing tensor '{key}' (not an OpenCLIP CLIP ViT state dict)")
    width, channels, patch, patch_w = _shape(state, "visual.conv1.weight", 4, source)
    positions, width_pos = _shape(state, "visual.positional_embedding", 2, source)
    grid = int(round(np.sqrt(positions - 1))) if positions > 1 else 0
    if patch != patch_w or width_pos != width or grid * grid != positions - 1:
        raise SafeJaxError(f"{source}: visual.conv1.weight {(width, channels, patch, patch_w)} and "
                           f"visual.positional_embedding {(positions, width_pos)} do not describe a square ViT")
    vocab, text_width = _shape(state, "token_embedding.weight", 2, source)
    context, _ = _shape(state, "positional_embedding", 2, source)
    embed = _shape(state, "visual.proj", 2, source)[1]
    if _shape(state, "text_projection", 2, source)[1] != embed:
        raise SafeJaxError(f"{source}: visual.proj and text_projection project to different widths "
                           f"({embed} vs {state['text_projection'].shape[1]})")

    def mlp(tower: str) -> int:
        key = f"{tower}transformer.resblocks.0.mlp.c_fc.weight"
        if key not in state:
            raise SafeJaxError(f"{source}: missing tensor '{key}'")
        return _shape(state, key, 2, source)[0]

    if arch is not None:
        if (width, text_width) != (arch.vision_width, arch.text_width):
            raise SafeJaxError(f"{source}: not a {model_name} checkpoint: widths vision {width}, text {text_width} "
                               f"where {model_name} has {arch.vision_width}, {arch.text_width}")
        vision_heads = vision_heads or arch.vision_heads
        text_heads = text_heads or arch.text_heads
        quick_gelu = arch.quick_gelu if quick_gelu is None else quick_gelu
    if vision_heads is None or text_heads is None:
        raise SafeJaxError(f"{source}: the head counts are not in the state dict: give model_name or both "
                           "vision_heads and text_heads")
    act = "quick_gelu" if quick_gelu else "gelu"
    text_mlp, vision_mlp = mlp(""), mlp("visual.")
    try:  # the configs check themselves (e.g. a width the head count does not divide): name the file
        text = CLIPTextConfig(
            vocab_size=vocab, hidden_size=text_width, intermediate_size=text_mlp,
            num_hidden_layers=_depth(state, ""), num_attention_heads=text_heads, max_position_embeddings=context,
            hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed,
            # eos_token_id 2 pools at the largest token id: OpenCLIP's text_pool_type "argmax".
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
        vision = CLIPVisionConfig(
            hidden_size=width, intermediate_size=vision_mlp, num_hidden_layers=_depth(state, "visual."),
            num_attention_heads=vision_heads, num_channels=channels, image_size=grid * patch, patch_size=patch,
            hidden_act=act, layer_norm_eps=1e-5,
        )
    except SafeJaxError as e:
        raise SafeJaxError(f"{source}: {e}") from None
    return CLIPConfig(text=text, vision=vision, projection_dim=embed)


def expected_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """The OpenCLIP state dict of ``config``'s architecture: key -> shape (no buffers)."""
    v, t, embed = config.vision, config.text, config.projection_dim
    shapes = {
        "visual.conv1.weight": (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
        "visual.class_embedding": (v.hidden_size,),
        "visual.positional_embedding": (v.num_patches + 1, v.hidden_size),
        "visual.proj": (v.hidden_size, embed),
        "token_embedding.weight": (t.vocab_size, t.hidden_size),
        "positional_embedding": (t.max_position_embeddings, t.hidden_size),
        "text_projection": (t.hidden_size, embed),
        "logit_scale": (),
    }
    for key, width in (("visual.ln_pre", v.hidden_size), ("visual.ln_post", v.hidden_size),
                       ("ln_final", t.hidden_size)):
        shapes[f"{key}.weight"] = shapes[f"{key}.bias"] = (width,)
    for tower, c in (("visual.", v), ("", t)):
        d, m = c.hidden_size, c.intermediate_size
        layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
                 "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
                 "mlp.c_fc.weight": (m, d), "mlp.c_fc.bias": (m,), "mlp.c_proj.weight": (d, m), "mlp.c_proj.bias": (d,)}
        for i in range(c.num_hidden_layers):
            shapes.update({f"{tower}transformer.resblocks.{i}.{rest}": shape for rest, shape in layer.items()})
    return shapes


def _hf_key(key: str) -> str | None:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    m = _LAYER.match(key)
    if m and m["rest"] in _LAYER_TENSORS:
        tower = "vision_model" if m["tower"] else "text_model"
        return f"{tower}.encoder.layers.{m['index']}.{_LAYER_TENSORS[m['rest']] or ''}"
    return None


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str | None = "ViT-H-14", *,
                       vision_heads: int | None = None, text_heads: int | None = None,
                       quick_gelu: bool | None = None, source: str = "open_clip state dict"
                       ) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
    """(config, transformers-layout state dict) of an OpenCLIP CLIP state dict (numpy arrays).

    Values are copied bit for bit (split and transposed, never cast). The first missing or
    unknown tensor is a one-line SafeJaxError naming it; ``source`` (the file) starts the line.
    """
    state = {key: value for key, value in state_dict.items() if key not in _BUFFERS}
    unknown = sorted(key for key in state if _hf_key(key) is None)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SafeJaxError(f"{source}: unknown tensor '{unknown[0]}'{more}: not part of a plain OpenCLIP CLIP ViT")
    config = infer_config(state, model_name, vision_heads=vision_heads, text_heads=text_heads,
                          quick_gelu=quick_gelu, source=source)
    wanted = expected_shapes(config)
    missing = sorted(set(wanted) - set(state))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SafeJaxError(f"{source}: missing tensor '{missing[0]}'{more}")
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise SafeJaxError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, the architecture "
                               f"its other tensors describe needs {shape}")
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        value = np.asarray(value)
        target = _hf_key(key)
        if key in _TRANSPOSED:
            out[target] = np.ascontiguousarray(value.T)
        elif key.endswith("attn.in_proj_weight") or key.endswith("attn.in_proj_bias"):
            leaf = "weight" if key.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{target}self_attn.{name}.{leaf}"] = np.ascontiguousarray(part)
        else:
            out[target] = value
    return config, out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """An OpenCLIP checkpoint's tensors as numpy arrays: a ``.pt``/``.bin`` read with
    ``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` training checkpoint, as HPS
    ships, or a bare state dict), or a ``.safetensors`` file. DataParallel's ``module.`` prefix
    is removed, as OpenCLIP's own loader does."""
    path = Path(path)
    if not path.is_file():
        raise SafeJaxError(f"OpenCLIP checkpoint {path} does not exist")
    try:
        import torch
    except ImportError:
        raise SafeJaxError(f"{path}: reading OpenCLIP checkpoints needs torch (the [torch] extra)") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise SafeJaxError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad or unsafe pickles
            raise SafeJaxError(f"cannot read {path} safely (weights_only=True): {str(e).splitlines()[0]}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise SafeJaxError(f"{path}: not an OpenCLIP checkpoint (expected a state dict or {{'state_dict': ...}})")
    prefixed = [key.startswith("module.") for key in state]
    if any(prefixed):
        if not all(prefixed):
            odd = next(key for key in state if not key.startswith("module."))
            raise SafeJaxError(f"{path}: some tensors carry the 'module.' prefix and some not (e.g. '{odd}')")
        state = {key.removeprefix("module."): value for key, value in state.items()}
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SafeJaxError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out


def load_open_clip(path: str | Path, model_name: str | None = "ViT-H-14", *, vision_heads: int | None = None,
                   text_heads: int | None = None, quick_gelu: bool | None = None, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, attention_impl: AttentionImpl = None,
                   remat_policy: str | None = None) -> tuple[CLIPModel, dict[str, Any]]:
    """(module, params) of an OpenCLIP checkpoint file, e.g. ``HPS_v2.1_compressed.pt``.

    Half-precision tensors are cast to ``param_dtype``. See the module
    docstring for ``model_name`` and the head/activation overrides.
    """
    source = str(path)
    config, state = convert_state_dict(read_state_dict(path), model_name, vision_heads=vision_heads,
                                       text_heads=text_heads, quick_gelu=quick_gelu, source=source)
    model = CLIPModel(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                      remat_policy=remat_policy)
    return model, from_hf_state_dict(state, model, dtype=param_dtype)
