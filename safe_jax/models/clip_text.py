"""CLIP's text transformer (Stable Diffusion's text encoder) in Flax.

Module and parameter names follow ``transformers.CLIPTextModel`` so ``safe_jax.io.convert`` maps the
weights mechanically: ``text_model.encoder.layers_0.self_attn.q_proj.kernel`` here is
``text_model.encoder.layers.0.self_attn.q_proj.weight`` in the checkpoint. Two configurations
matter: SD 1.x (OpenAI CLIP ViT-L/14 text tower, quick_gelu) and SD 2.x (OpenCLIP ViT-H/14 text
tower converted to the transformers format, gelu, last of its 24 layers dropped).

Checkpoint keys: hub checkpoints (and ``to_hf_state_dict`` by default) carry the ``text_model.``
prefix. transformers 5 removed that level from the in-memory ``CLIPTextModel`` (its ``state_dict()``
and ``save_pretrained`` use ``embeddings.…``, ``encoder.…``) and strips the prefix when loading, so
both spellings load everywhere; ``from_hf_state_dict`` accepts both too. ``state_dict_prefix`` tells
which one a checkpoint uses, and the pipeline keeps it in ``CLIPTextConfig.state_dict_prefix`` so
that an export spells its keys as the import did. Old checkpoints also hold
the ``text_model.embeddings.position_ids`` buffer (always ``arange(77)``); it is not a parameter
and is dropped on import, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from safe_jax.errors import SafeJaxError
from safe_jax.io.convert import flax_to_torch, torch_to_flax
from safe_jax.models import config_fields as fields
from safe_jax.models.attention_ops import AttentionImpl, multi_head_attention

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Written by to_hf() but not fields here: dropout/init settings that do not change inference.
_HF_CONSTANTS = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}
_PREFIX = "text_model."
_POSITION_IDS = "text_model.embeddings.position_ids"
_PROJECTION = "text_projection."  # CLIPTextModelWithProjection's one weight outside text_model
# Dataclass fields of ours that are not config.json keys.
LOCAL_FIELDS = ("hf_extra", "state_dict_prefix")


def hf_field_names(cls: type) -> list[str]:
    """The fields of a config dataclass that are transformers config.json keys."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in LOCAL_FIELDS]


def check_encoder(what: str, hidden_act: Any, hidden_size: int, num_attention_heads: int) -> None:
    """The checks a CLIP tower's config shares (text or vision); sizes are already positive ints."""
    if not isinstance(hidden_act, str) or hidden_act not in _ACTIVATIONS:
        raise SafeJaxError(f"{what}: hidden_act {fields.show(hidden_act)} is not supported "
                           f"(supported: {', '.join(_ACTIVATIONS)})")
    if hidden_size % num_attention_heads:
        raise SafeJaxError(f"{what}: hidden_size {hidden_size} is not a multiple of "
                           f"num_attention_heads {num_attention_heads}")


def split_hf(cls: type, config: Mapping[str, Any], required: tuple[str, ...], what: str) -> tuple[dict, str]:
    """A transformers config.json dict → (the dataclass ``cls``'s fields, the other keys as JSON,
    for ``to_hf`` to give back unchanged); a clear error when a required key is missing."""
    config = fields.config_object(what, config)
    missing = [key for key in required if key not in config]
    if missing:
        raise SafeJaxError(f"{what}: config lacks {', '.join(missing)}")
    names = set(hf_field_names(cls))
    known = {key: value for key, value in config.items() if key in names}
    extra = {key: value for key, value in config.items() if key not in names}
    return known, json.dumps(extra, sort_keys=True)


@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that change the forward pass.

    ``eos_token_id == 2`` is the legacy value in SD 1.x/2.x configs: it makes the pooler take the
    position of the largest token id (EOS is the largest in CLIP's vocabulary), as transformers does.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    # The source config.json's other keys (as JSON), so to_hf() gives them back unchanged.
    hf_extra: str = dataclasses.field(default="{}", repr=False, compare=False)
    # How the checkpoint spelled its tensor names: "text_model." (hub checkpoints) or "" (what
    # transformers 5's save_pretrained writes, the default); an export writes the same back.
    state_dict_prefix: str = dataclasses.field(default="", repr=False, compare=False)

    def __post_init__(self):
        check_text_fields({name: getattr(self, name) for name in hf_field_names(type(self))}, "CLIP text encoder")
        if self.state_dict_prefix not in ("", _PREFIX):
            raise SafeJaxError(f"CLIP text encoder: state_dict_prefix must be '' or {_PREFIX!r}, "
                               f"got {fields.show(self.state_dict_prefix)}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "CLIP text encoder") -> "CLIPTextConfig":
        """From a transformers config.json dict; keys we do not use are kept for ``to_hf``.
        Every field is checked; ``source`` names the file in the one-line error."""
        known, extra = split_hf(cls, config, _REQUIRED, source)
        check_text_fields(known, source)
        return cls(**known, hf_extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that ``transformers.CLIPTextModel.from_pretrained`` accepts."""
        extra = json.loads(self.hf_extra)
        out = {**_HF_CONSTANTS, **extra}
        if "dtype" in extra:  # transformers 5 spelling of torch_dtype: keep just the one given
            del out["torch_dtype"]
        out.update({name: getattr(self, name) for name in hf_field_names(type(self))})
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def check_text_fields(values: Mapping[str, Any], what: str) -> None:
    """Types and ranges of a CLIP text config's fields (absent ones take the dataclass defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CLIPTextConfig)}
    v = {**defaults, **values}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "projection_dim"):
        fields.config_int(what, key, v[key])
    fields.config_number(what, "layer_norm_eps", v["layer_norm_eps"], positive=True)
    if not fields.is_int(v["eos_token_id"]):  # it picks the pooled position, so one id
        raise SafeJaxError(f"{what}: eos_token_id must be one id, got {fields.show(v['eos_token_id'])}")
    fields.config_int(what, "eos_token_id", v["eos_token_id"], 0)
    for key in ("bos_token_id", "pad_token_id"):
        fields.config_optional_int(what, key, v[key], 0)
    check_encoder(what, v["hidden_act"], v["hidden_size"], v["num_attention_heads"])


# The text_encoder/config.json of runwayml/stable-diffusion-v1-5 (= openai/clip-vit-large-patch14's
# text config) and of stabilityai/stable-diffusion-2-1, both with the legacy token ids 0/2/1.
PRESETS: dict[str, CLIPTextConfig] = {
    "sd15": CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
    "sd21": CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, hidden_act="gelu", projection_dim=512,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
    # Stable Diffusion XL's two encoders: OpenAI CLIP ViT-L/14's text tower (text_encoder) and
    # OpenCLIP ViT-bigG/14's (text_encoder_2, a CLIPTextModelWithProjection), legacy ids 0/2/1.
    "sdxl": CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
    "sdxl-2": CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
    # Real vocabulary (so the real tokenizer works), toy width; modern token ids (EOS pooling).
    "tiny": CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ),
    # tiny-xl's second encoder: another width, gelu, a projection of its own width.
    "tiny-2": CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=53, num_hidden_layers=4,
        num_attention_heads=4, hidden_act="gelu", projection_dim=24,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ),
}


def preset(name: str) -> CLIPTextConfig:
    """One of ``PRESETS`` by name."""
    if name not in PRESETS:
        raise SafeJaxError(f"unknown CLIP text preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


class _Module(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(0.02), name=name)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        # use_fast_variance=False: E[(x-μ)²] like PyTorch, not E[x²]-μ², for exact parity.
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, use_fast_variance=False,
                            dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class CLIPTextEmbeddings(_Module):
    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                         embedding_init=nn.initializers.normal(0.02), name=name)
        positions = jnp.arange(input_ids.shape[-1])[None]
        return embed(c.vocab_size, "token_embedding")(input_ids) + embed(
            c.max_position_embeddings, "position_embedding")(positions)


class CLIPAttention(_Module):
    attention_impl: AttentionImpl = None
    causal: bool = True  # the text tower's mask; CLIP's vision tower (clip_vision.py) attends to all

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        width = self.config.hidden_size
        q, k, v = (self.dense(width, name)(x) for name in ("q_proj", "k_proj", "v_proj"))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = multi_head_attention(q, k, v, self.config.num_attention_heads,
                                   implementation=self.attention_impl, is_causal=self.causal, mask=mask)
        return self.dense(width, "out_proj")(out)


class CLIPMLP(_Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dense(self.config.intermediate_size, "fc1")(x)
        return self.dense(self.config.hidden_size, "fc2")(_ACTIVATIONS[self.config.hidden_act](x))


class CLIPEncoderLayer(_Module):
    attention_impl: AttentionImpl = None
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + CLIPAttention(**kw, attention_impl=self.attention_impl, causal=self.causal, name="self_attn")(
            self.layer_norm("layer_norm1")(x), key_mask)
        return x + CLIPMLP(**kw, name="mlp")(self.layer_norm("layer_norm2")(x))


class CLIPEncoder(_Module):
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """Every layer's output, preceded by the input (transformers' ``hidden_states``)."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                     attention_impl=self.attention_impl, name=f"layers_{i}")
            states.append(layer(states[-1], key_mask))
        return tuple(states)


class CLIPTextTransformer(_Module):
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0, attention_mask: jax.Array | None = None
                 ) -> dict[str, Any]:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise SafeJaxError(f"CLIP text encoder: {input_ids.shape[-1]} tokens, at most "
                               f"{c.max_position_embeddings} fit")
        if not isinstance(clip_skip, int):  # it picks a layer, so it cannot be traced
            raise SafeJaxError(f"clip_skip must be a Python int, got {type(clip_skip).__name__}")
        if not 0 <= clip_skip < c.num_hidden_layers:
            raise SafeJaxError(f"clip_skip must be in [0, {c.num_hidden_layers - 1}], got {clip_skip}")
        kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype)
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        hidden_states = CLIPEncoder(**kw, attention_impl=self.attention_impl, name="encoder")(
            CLIPTextEmbeddings(**kw, name="embeddings")(input_ids), key_mask)
        final_layer_norm = self.layer_norm("final_layer_norm")
        last = final_layer_norm(hidden_states[-1])
        encoded = last if clip_skip == 0 else final_layer_norm(hidden_states[-(clip_skip + 1)])
        if c.eos_token_id == 2:  # legacy configs: EOS (49407) is the largest id in each row
            eos_at = jnp.argmax(input_ids, axis=-1)
        else:  # first EOS; padding may repeat it
            eos_at = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos_at]
        return {"last_hidden_state": last, "hidden_states": hidden_states,
                "pooler_output": pooled, "encoded": encoded}


class CLIPTextModel(nn.Module):
    """``transformers.CLIPTextModel`` in Flax; parameters live under ``text_model`` as in checkpoints.

    ``__call__(input_ids [B, T] int, clip_skip=0)`` returns a dict with
    ``last_hidden_state`` (after the final LayerNorm), ``hidden_states`` (embeddings, then each
    layer's output, un-normalised, like transformers' ``output_hidden_states=True``),
    ``pooler_output`` (final state at the EOS token) and ``encoded``: what Stable Diffusion
    conditions on. ``encoded`` follows diffusers' ``clip_skip``: 0 is ``last_hidden_state``; k > 0
    is ``final_layer_norm(hidden_states[-(k + 1)])``, so 1 is the penultimate layer, normalised.
    (SD 2.x's 23-layer encoder already is OpenCLIP-H's penultimate layer; it uses clip_skip 0.)
    The attention is causal with no padding mask, as Stable Diffusion runs it; ``attention_mask``
    ([B, T], 1 = attend, 0 = hidden from every query) is transformers' optional key mask, which
    Compel's down-weighting uses to encode a prompt without one fragment.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0, attention_mask: jax.Array | None = None
                 ) -> dict[str, Any]:
        text_model = CLIPTextTransformer(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                         attention_impl=self.attention_impl, name="text_model")
        return text_model(input_ids, clip_skip, attention_mask)


class CLIPTextModelWithProjection(nn.Module):
    """``transformers.CLIPTextModelWithProjection``: SDXL's second text encoder. The same outputs
    as ``CLIPTextModel`` plus ``text_embeds``, the pooled state through ``text_projection`` (no
    bias): the pooled conditioning of SDXL's UNet. Its checkpoints keep the ``text_model.`` prefix
    and add ``text_projection.weight``."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0, attention_mask: jax.Array | None = None
                 ) -> dict[str, Any]:
        out = CLIPTextTransformer(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                  attention_impl=self.attention_impl, name="text_model")(
            input_ids, clip_skip, attention_mask)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(0.02),
                              name="text_projection")
        return {**out, "text_embeds": projection(out["pooler_output"])}


def abstract_params(model: CLIPTextModel) -> dict[str, Any]:
    """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    ids = jax.ShapeDtypeStruct((1, model.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def from_hf_state_dict(
    state_dict: Mapping[str, np.ndarray], model: CLIPTextModel, *, dtype: Any = None
) -> dict[str, Any]:
    """Flax params (the ``"params"`` collection) from a transformers CLIPTextModel (or
    CLIPTextModelWithProjection) state dict.

    Takes numpy arrays, keys with or without the ``text_model.`` prefix (hub checkpoints vs
    transformers 5 in memory); the legacy ``position_ids`` buffer is ignored.
    """
    normalised = {}
    for key, value in state_dict.items():
        full = key if key.startswith((_PREFIX, _PROJECTION)) else _PREFIX + key
        if full in normalised:
            raise SafeJaxError(f"text_encoder: the checkpoint holds {full.removeprefix(_PREFIX)!r} both with "
                               f"and without the {_PREFIX!r} prefix")
        if full != _POSITION_IDS:
            normalised[full] = value
    return torch_to_flax(normalised, abstract_params(model), what="text_encoder", dtype=dtype)


def state_dict_prefix(state_dict: Mapping[str, Any]) -> str:
    """How a CLIPTextModel checkpoint spells its keys: ``"text_model."`` (hub checkpoints) or
    ``""`` (transformers 5's ``save_pretrained``); for a mix, what most keys use."""
    prefixed = sum(key.startswith(_PREFIX) for key in state_dict)
    return _PREFIX if 2 * prefixed > len(state_dict) else ""


def to_hf_state_dict(params: Mapping[str, Any], prefix: str = _PREFIX) -> dict[str, np.ndarray]:
    """The checkpoint state dict of Flax ``params``: ``text_model.``-prefixed keys, as on the hub,
    or with ``prefix=""`` the keys transformers 5 saves (``embeddings.…``, ``encoder.…``)."""
    if prefix not in ("", _PREFIX):
        raise SafeJaxError(f"text_encoder: the key prefix must be '' or {_PREFIX!r}, got {fields.show(prefix)}")
    state = flax_to_torch(params)
    return state if prefix == _PREFIX else {key.removeprefix(_PREFIX): value for key, value in state.items()}
