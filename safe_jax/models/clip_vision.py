"""CLIP's vision tower and the whole dual-encoder ``CLIPModel`` in Flax (reward models, FID_CLIP).

Module and parameter names follow ``transformers.CLIPModel`` so ``safe_jax.io.convert`` maps the
weights mechanically, one to one and bitwise:

    vision_model.embeddings.class_embedding              (hidden,)
    vision_model.embeddings.patch_embedding.weight       conv, no bias (OIHW <-> Flax HWIO)
    vision_model.embeddings.position_embedding.weight    (num_patches + 1, hidden)
    vision_model.pre_layrnorm.{weight,bias}              (sic: transformers' spelling)
    vision_model.encoder.layers.N.*                      the text tower's layers, no causal mask
    vision_model.post_layernorm.{weight,bias}            on the CLS token only
    text_model.*                                         ``clip_text.CLIPTextTransformer``
    visual_projection.weight, text_projection.weight     no bias
    logit_scale                                          a scalar

Checkpoints that hold the ``position_ids`` buffers (``text_model.embeddings.position_ids``,
``vision_model.embeddings.position_ids``; transformers 5 no longer saves them) load, and the
buffers are dropped, as transformers does. Any other missing or extra tensor is an error.

Images are NHWC here (``pixel_values`` [B, H, W, 3], already CLIP-normalised; see
``safe_jax.train.rewards.preprocess``), where transformers takes NCHW. Positional embeddings are not
interpolated: H = W = ``image_size`` is required, as transformers requires by default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from safe_jax.errors import SafeJaxError
from safe_jax.io.convert import flax_to_torch, torch_to_flax
from safe_jax.models import clip_text
from safe_jax.models import config_fields as fields
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.blocks import remat
from safe_jax.models.clip_text import CLIPEncoderLayer, CLIPTextConfig, CLIPTextTransformer

_VISION_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "image_size", "patch_size")
_VISION_HF_CONSTANTS = {
    "model_type": "clip_vision_model",
    "attention_dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _int_size(value: Any, key: str, what: str = "CLIP vision encoder") -> int:
    """transformers allows ``image_size``/``patch_size`` as [h, w]; CLIP only ever uses squares."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not fields.is_int(value) or value <= 0:
        raise SafeJaxError(f"{what}: {key} must be a positive int (square), got {fields.show(value)}")
    return value


def check_vision_fields(values: Mapping[str, Any], what: str) -> None:
    """Types and ranges of a CLIP vision config's fields (absent ones take the dataclass defaults)."""
    v = {**_defaults(CLIPVisionConfig), **values}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels"):
        fields.config_int(what, key, v[key])
    image_size, patch_size = _int_size(v["image_size"], "image_size", what), _int_size(v["patch_size"], "patch_size", what)
    fields.config_number(what, "layer_norm_eps", v["layer_norm_eps"], positive=True)
    clip_text.check_encoder(what, v["hidden_act"], v["hidden_size"], v["num_attention_heads"])
    if patch_size > image_size:
        raise SafeJaxError(f"{what}: patch_size {patch_size} > image_size {image_size}")


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``CLIPVisionConfig`` that change the forward pass."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    hf_extra: str = dataclasses.field(default="{}", repr=False, compare=False)

    def __post_init__(self):
        check_vision_fields({name: getattr(self, name) for name in clip_text.hf_field_names(type(self))},
                            "CLIP vision encoder")
        object.__setattr__(self, "image_size", _int_size(self.image_size, "image_size"))
        object.__setattr__(self, "patch_size", _int_size(self.patch_size, "patch_size"))

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "CLIP vision encoder") -> "CLIPVisionConfig":
        """From a transformers vision config dict; every field is checked, ``source`` names it in errors."""
        known, extra = clip_text.split_hf(cls, config, _VISION_REQUIRED, source)
        check_vision_fields(known, source)
        return cls(**known, hf_extra=extra)

    def to_hf(self) -> dict[str, Any]:
        out = {**_VISION_HF_CONSTANTS, **json.loads(self.hf_extra)}
        out.update({name: getattr(self, name) for name in clip_text.hf_field_names(type(self))})
        return out

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _defaults(cls) -> dict[str, Any]:
    """A config class's defaults, which are transformers' defaults for the same fields."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in clip_text.LOCAL_FIELDS}


@dataclass(frozen=True)
class CLIPConfig:
    """A transformers ``CLIPConfig``: both towers, the shared projection width and the logit scale."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    hf_extra: str = dataclasses.field(default="{}", repr=False, compare=False)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "CLIP config") -> "CLIPConfig":
        """From a ``CLIPModel`` config.json dict; every field is checked, ``source`` names it in errors.

        Sub-config keys that are absent take transformers' defaults. Old hub configs also hold
        ``text_config_dict`` / ``vision_config_dict``; as in transformers, such a dict, completed
        with the defaults, overrides ``text_config`` / ``vision_config``.
        """
        if not isinstance(config, Mapping):
            raise SafeJaxError(f"{source}: CLIP config must be a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type", "clip")
        if model_type != "clip":
            raise SafeJaxError(
                f"not a CLIPModel config (model_type '{model_type}'): a reward model needs both towers "
                "and their projections (transformers CLIPModel, model_type 'clip')"
            )

        def sub(name: str, config_cls) -> dict[str, Any]:
            base = config.get(f"{name}_config") or {}
            override = config.get(f"{name}_config_dict")
            if not isinstance(base, Mapping) or not isinstance(override or {}, Mapping):
                raise SafeJaxError(f"{source}: {name}_config must be a JSON object")
            if override is not None:
                return {**base, **_defaults(config_cls), **override}
            return {**_defaults(config_cls), **base}

        text = CLIPTextConfig.from_hf(sub("text", CLIPTextConfig), f"{source}: text_config")
        vision = CLIPVisionConfig.from_hf(sub("vision", CLIPVisionConfig), f"{source}: vision_config")
        projection_dim = fields.config_int(source, "projection_dim", config.get("projection_dim", 512))
        logit_scale = fields.config_number(source, "logit_scale_init_value",
                                                 config.get("logit_scale_init_value", 2.6592))
        drop = {"text_config", "vision_config", "text_config_dict", "vision_config_dict",
                "projection_dim", "logit_scale_init_value"}
        extra = {key: value for key, value in config.items() if key not in drop}
        return cls(text=text, vision=vision, projection_dim=projection_dim, logit_scale_init_value=float(logit_scale),
                   hf_extra=json.dumps(extra, sort_keys=True))

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that ``transformers.CLIPModel.from_pretrained`` accepts."""
        text = self.text.to_hf()
        text.pop("architectures", None)
        out = {"architectures": ["CLIPModel"], "model_type": "clip", **json.loads(self.hf_extra)}
        out.update(text_config=text, vision_config=self.vision.to_hf(), projection_dim=self.projection_dim,
                   logit_scale_init_value=self.logit_scale_init_value)
        return out


def _config(text: CLIPTextConfig, vision: CLIPVisionConfig, projection_dim: int) -> CLIPConfig:
    return CLIPConfig(text=dataclasses.replace(text, projection_dim=projection_dim), vision=vision,
                      projection_dim=projection_dim)


# Architectures (random weights until loaded): the reward and metric models of METHOD.md.
PRESETS: dict[str, CLIPConfig] = {
    # Real CLIP vocabulary (the real tokenizer works), toy widths: tests and the demo.
    "tiny": _config(
        dataclasses.replace(clip_text.PRESETS["tiny"], num_hidden_layers=2),
        CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
        projection_dim=16,
    ),
    # openai/clip-vit-base-patch32: clean-fid's FID_CLIP feature extractor.
    "clip-vit-base-patch32": _config(
        dataclasses.replace(clip_text.PRESETS["sd15"], hidden_size=512, intermediate_size=2048,
                            num_attention_heads=8),
        CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=32),
        projection_dim=512,
    ),
    # openai/clip-vit-large-patch14: SD 1.x's text encoder with its vision tower; CLIPScore.
    "clip-vit-large-patch14": _config(
        clip_text.PRESETS["sd15"],
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=224, patch_size=14),
        projection_dim=768,
    ),
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K in transformers format = PickScore_v1's architecture.
    "clip-vit-h-14": _config(
        dataclasses.replace(clip_text.PRESETS["sd21"], num_hidden_layers=24),
        CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         image_size=224, patch_size=14, hidden_act="gelu"),
        projection_dim=1024,
    ),
}


def preset(name: str) -> CLIPConfig:
    if name not in PRESETS:
        raise SafeJaxError(f"unknown CLIP preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]



class CLIPVisionEmbeddings(clip_text._Module):
    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        b, h, w, channels = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size) or channels != c.num_channels:
            raise SafeJaxError(
                f"CLIP vision encoder: images must be [B, {c.image_size}, {c.image_size}, {c.num_channels}] "
                f"(NHWC, preprocessed), got {tuple(pixel_values.shape)}"
            )
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(
            pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size)), patches], 1)
        positions = nn.Embed(c.num_patches + 1, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             embedding_init=nn.initializers.normal(0.02), name="position_embedding")
        return tokens + positions(jnp.arange(c.num_patches + 1)[None])


class CLIPVisionEncoder(clip_text._Module):
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Every layer's output, preceded by the input (transformers' ``hidden_states``)."""
        layer_cls = remat(CLIPEncoderLayer, self.remat_policy)
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = layer_cls(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl, causal=False, name=f"layers_{i}")
            states.append(layer(states[-1]))
        return tuple(states)


class CLIPVisionTransformer(clip_text._Module):
    """``transformers.CLIPVisionModel``'s body: returns ``last_hidden_state`` (not normalised),
    ``hidden_states`` and ``pooler_output`` (``post_layernorm`` of the CLS token)."""

    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, Any]:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(**kw, name="embeddings")(pixel_values)
        x = self.layer_norm("pre_layrnorm")(x)
        states = CLIPVisionEncoder(**kw, attention_impl=self.attention_impl, remat_policy=self.remat_policy,
                                   name="encoder")(x)
        last = states[-1]
        return {"last_hidden_state": last, "hidden_states": states,
                "pooler_output": self.layer_norm("post_layernorm")(last[:, 0])}


def l2_normalise(x: jax.Array) -> jax.Array:
    """x / ‖x‖ over the last axis in fp32, computed as transformers' CLIPModel does."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class CLIPModel(nn.Module):
    """``transformers.CLIPModel`` in Flax.

    ``__call__(pixel_values [B, S, S, 3], input_ids [B', T])`` gives ``image_embeds`` [B, P] and
    ``text_embeds`` [B', P] (projected, L2-normalised, fp32), ``logits_per_image`` [B, B']
    = exp(logit_scale)·cos and ``logits_per_text`` (its transpose), as transformers does.
    ``get_image_features`` / ``get_text_features`` (via ``apply(..., method=...)``) give the
    projected, un-normalised features of one tower. ``remat_policy`` ("full" or a
    ``jax.checkpoint_policies`` name) rematerialises each vision layer in the backward pass.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        self.text_model = CLIPTextTransformer(config=c.text, **kw)
        self.vision_model = CLIPVisionTransformer(config=c.vision, remat_policy=self.remat_policy, **kw)
        dense = lambda: nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=nn.initializers.normal(0.02))
        self.visual_projection = dense()
        self.text_projection = dense()
        self.logit_scale = self.param(
            "logit_scale", lambda _: jnp.asarray(c.logit_scale_init_value, self.param_dtype))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        return self.text_projection(self.text_model(input_ids)["pooler_output"])

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> dict[str, jax.Array]:
        image = l2_normalise(self.get_image_features(pixel_values))
        text = l2_normalise(self.get_text_features(input_ids))
        logits_per_text = (text @ image.T) * jnp.exp(self.logit_scale.astype(jnp.float32))
        return {"image_embeds": image, "text_embeds": text,
                "logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text}


def abstract_params(model: CLIPModel) -> dict[str, Any]:
    """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    c = model.config
    pixels = jax.ShapeDtypeStruct((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, c.text.max_position_embeddings), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]


def from_hf_state_dict(state_dict: Mapping[str, np.ndarray], model: CLIPModel, *, dtype: Any = None
                       ) -> dict[str, Any]:
    """Flax params from a transformers ``CLIPModel`` state dict (numpy arrays, checkpoint keys).

    The ``position_ids`` buffers of old checkpoints are dropped; anything else missing, extra or
    mis-shaped is a SafeJaxError naming the tensor.
    """
    state = {key: value for key, value in state_dict.items() if key not in _BUFFERS}
    return torch_to_flax(state, abstract_params(model), what="CLIP model", dtype=dtype)


def to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The transformers ``CLIPModel`` state dict of Flax ``params`` (bitwise: only transposes)."""
    return flax_to_torch(params)
