"""ImageReward (Xu et al. 2023) in Flax: BLIP's ViT, BLIP's BERT text encoder with cross-attention
to the image, and the reward MLP.

Module and parameter names follow the PyTorch modules of the ``image-reward`` package, so the
ImageReward.pt state dict maps onto our tree one to one (``safe_jax.io.convert``):

    blip.visual_encoder.patch_embed.proj.{weight,bias}      conv (OIHW <-> Flax HWIO), with bias
    blip.visual_encoder.cls_token                           (1, 1, width)
    blip.visual_encoder.pos_embed                           (1, patches + 1, width)
    blip.visual_encoder.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*
    blip.visual_encoder.norm.*                              applied to every token
    blip.text_encoder.embeddings.{word_embeddings,position_embeddings,LayerNorm}.*
    blip.text_encoder.encoder.layer.N.{attention,crossattention}.{self.{query,key,value},output.{dense,LayerNorm}}.*
    blip.text_encoder.encoder.layer.N.{intermediate.dense,output.dense,output.LayerNorm}.*
    mlp.layers.{0,2,4,6,7}.{weight,bias}                    Linear layers (1, 3, 5 are Dropouts)

The checkpoint also holds tensors the score never reads: BLIP's contrastive heads
(``blip.vision_proj``, ``blip.text_proj``) and the ``position_ids`` buffer (``arange``, which the
reference indexes but which is the identity on positions). ``from_state_dict`` checks and drops
exactly those; any other missing, extra or mis-shaped tensor is an error, where the reference's
``load_state_dict(strict=False)`` would silently keep random weights.

What the reference computes (``ImageReward.score``): the ViT's whole normalised token sequence
(CLS + patches) is the memory of the text encoder's cross-attention, with an all-ones mask; the
text encoder runs in BLIP's "multimodal" mode on the prompt's BERT ids (the [CLS] id stays first:
ImageReward does not swap in BLIP's [ENC] token); the feature is the first token of its last
layer, and the reward is ``(mlp(feature) - mean) / std``. The MLP has no activations, as
published. Padding tokens are masked out as keys of the self-attention; BLIP adds -10000 to their
scores instead, which after the softmax is the same exact zero weight in float32.

Images are NHWC here ([B, S, S, 3], CLIP-normalised), where PyTorch takes NCHW; positional
embeddings are not interpolated, so S must be the config's ``image_size`` (224 for the released
model), as the reference's patch embedding asserts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from safe_jax.errors import SafeJaxError
from safe_jax.io.convert import flax_to_torch, torch_key, torch_to_flax
from safe_jax.models import config_fields as fields
from safe_jax.models.attention_ops import AttentionImpl, multi_head_attention
from safe_jax.models.blocks import remat

# The reward normalisation ImageReward hard-codes (ImageReward.__init__), and its prompt length.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # hard-coded in ImageReward's MLP, whatever the text width
_MLP_LINEARS = (0, 2, 4, 6, 7)  # their indices in its nn.Sequential (Dropouts in between)

# What the reference's state dict holds beyond the score's weights (see the module docstring).
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"
UNUSED_HEADS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias")

# Keys of med_config.json that change the forward pass, with BERT's defaults where it has one.
_MED_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}  # transformers' "gelu" is erf GELU


def _check_sizes(what: str, width: int, heads: int) -> None:
    if width % heads:
        raise SafeJaxError(f"{what}: width {width} is not a multiple of {heads} attention heads")


@dataclass(frozen=True)
class BLIPVisionConfig:
    """BLIP's ``VisionTransformer``: ``create_vit('large', 224)`` by default (ViT-L/16).

    The reference builds it from code, not from a file: ImageReward always asks for 'large' at 224.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        what = "BLIP vision encoder"
        for key in ("image_size", "patch_size", "width", "depth", "heads"):
            fields.config_int(what, key, getattr(self, key))
        fields.config_number(what, "mlp_ratio", self.mlp_ratio, positive=True)
        fields.config_number(what, "layer_norm_eps", self.layer_norm_eps, positive=True)
        if self.image_size % self.patch_size:
            raise SafeJaxError(f"{what}: image_size {self.image_size} is not a multiple of "
                               f"patch_size {self.patch_size}")
        _check_sizes(what, self.width, self.heads)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # as timm's Block computes it


@dataclass(frozen=True)
class MEDConfig:
    """The BERT fields of BLIP's ``med_config.json`` that change the forward pass.

    The file's ``encoder_width`` is not one of them: BLIP overwrites it with the ViT's width.
    """

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    # The file's other keys (as JSON), so to_med_config() gives them back unchanged.
    extra: str = dataclasses.field(default="{}", repr=False, compare=False)

    def __post_init__(self):
        what = "BLIP text encoder"
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings"):
            fields.config_int(what, key, getattr(self, key))
        fields.config_number(what, "layer_norm_eps", self.layer_norm_eps, positive=True)
        _check_act(what, self.hidden_act)
        _check_sizes(what, self.hidden_size, self.num_attention_heads)
        if self.max_position_embeddings < MAX_LENGTH:
            raise SafeJaxError(f"{what}: max_position_embeddings {self.max_position_embeddings} < the "
                               f"{MAX_LENGTH} tokens ImageReward feeds it")

    @classmethod
    def from_med_config(cls, config: Any, source: str = "med_config.json") -> "MEDConfig":
        """From the JSON object of a med_config.json; ``source`` names it in the one-line errors.

        Settings the reference reads but we do not implement must hold the values ImageReward's
        checkpoint uses: cross-attention in every layer, absolute position embeddings.
        """
        config = fields.config_object(source, config)
        missing = [key for key in _MED_REQUIRED if key not in config]
        if missing:
            raise SafeJaxError(f"{source}: lacks {', '.join(missing)}")
        cross = config.get("add_cross_attention")
        if cross is not True:
            raise SafeJaxError(f"{source}: add_cross_attention must be true (ImageReward's text encoder "
                               f"attends to the image in every layer), got {fields.show(cross)}")
        position = config.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise SafeJaxError(f"{source}: unsupported position_embedding_type {fields.show(position)} "
                               "(safe-jax supports 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {key: config[key] for key in names if key in config}
        extra = {key: value for key, value in config.items() if key not in names}
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings"):
            if key in known:
                fields.config_int(source, key, known[key])
        if "layer_norm_eps" in known:
            fields.config_number(source, "layer_norm_eps", known["layer_norm_eps"], positive=True)
        _check_act(source, known.get("hidden_act", "gelu"))
        try:
            return cls(**known, extra=json.dumps(extra, sort_keys=True))
        except SafeJaxError as e:
            raise SafeJaxError(f"{source}: {e}") from None

    def to_med_config(self) -> dict[str, Any]:
        out = json.loads(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out.setdefault("add_cross_attention", True)
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_act(what: str, act: Any) -> None:
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise SafeJaxError(f"{what}: hidden_act {fields.show(act)} is not supported "
                           f"(supported: {', '.join(_ACTIVATIONS)})")


@dataclass(frozen=True)
class ImageRewardConfig:
    """The whole reward model: BLIP's two encoders and the MLP head (its widths are fixed)."""

    text: MEDConfig = MEDConfig()
    vision: BLIPVisionConfig = BLIPVisionConfig()

    def __post_init__(self):
        if not isinstance(self.text, MEDConfig) or not isinstance(self.vision, BLIPVisionConfig):
            raise SafeJaxError("ImageRewardConfig needs a MEDConfig and a BLIPVisionConfig")

    @property
    def encoder_width(self) -> int:
        """The width of the cross-attention memory: BLIP sets it to the ViT's, whatever the file says."""
        return self.vision.width


# The released ImageReward-v1.0 (BLIP ViT-L/16 at 224 + BERT-base, med_config.json of the hub) and
# the toy size of the reference fixtures (tests/reference/fixtures_imagereward.py).
PRESETS: dict[str, ImageRewardConfig] = {
    "large": ImageRewardConfig(),
    "tiny": ImageRewardConfig(
        text=MEDConfig(vocab_size=154, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=40),
        vision=BLIPVisionConfig(image_size=64, patch_size=16, width=48, depth=2, heads=3),
    ),
}
VISION_PRESETS = {name: config.vision for name, config in PRESETS.items()}


def preset(name: str) -> ImageRewardConfig:
    if name not in PRESETS:
        raise SafeJaxError(f"unknown ImageReward preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class _Module(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(0.02), name=name)

    def layer_norm(self, eps: float, name: str) -> nn.LayerNorm:
        # use_fast_variance=False: E[(x-μ)²] like PyTorch, not E[x²]-μ², for exact parity.
        return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)


class PatchEmbed(_Module):
    config: BLIPVisionConfig = BLIPVisionConfig()

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="proj")(pixel_values.astype(self.dtype))
        return x.reshape(x.shape[0], -1, c.width)  # row-major over the grid, as torch's flatten(2)


class ViTAttention(_Module):
    config: BLIPVisionConfig = BLIPVisionConfig()
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        q, k, v = jnp.split(self.dense(3 * c.width, "qkv")(x), 3, axis=-1)  # torch's reshape(B, N, 3, H, d)
        out = multi_head_attention(q, k, v, c.heads, implementation=self.attention_impl)
        return self.dense(c.width, "proj")(out)


class ViTMlp(_Module):
    config: BLIPVisionConfig = BLIPVisionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.dense(self.config.mlp_width, "fc1")(x), approximate=False)  # nn.GELU
        return self.dense(self.config.width, "fc2")(x)


class ViTBlock(_Module):
    config: BLIPVisionConfig = BLIPVisionConfig()
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + ViTAttention(config=c, attention_impl=self.attention_impl, **kw, name="attn")(
            self.layer_norm(c.layer_norm_eps, "norm1")(x))
        return x + ViTMlp(config=c, **kw, name="mlp")(self.layer_norm(c.layer_norm_eps, "norm2")(x))


class BLIPVisionTransformer(_Module):
    """BLIP's ``VisionTransformer``: [B, S, S, 3] -> every token after the final norm [B, 1 + P, width]."""

    config: BLIPVisionConfig = BLIPVisionConfig()
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        b, h, w, channels = pixel_values.shape
        if (h, w, channels) != (c.image_size, c.image_size, 3):
            raise SafeJaxError(f"BLIP vision encoder: images must be [B, {c.image_size}, {c.image_size}, 3] "
                               f"(NHWC, preprocessed), got {tuple(pixel_values.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(config=c, **kw, name="patch_embed")(pixel_values)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c.width), self.param_dtype)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, c.num_patches + 1, c.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.width)), x], axis=1)
        x = x + pos.astype(x.dtype)
        block = remat(ViTBlock, self.remat_policy)
        for i in range(c.depth):
            x = block(config=c, attention_impl=self.attention_impl, **kw, name=f"blocks_{i}")(x)
        return self.layer_norm(c.layer_norm_eps, "norm")(x)


class BertEmbeddings(_Module):
    config: MEDConfig = MEDConfig()

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise SafeJaxError(f"BLIP text encoder: {input_ids.shape[-1]} tokens > max_position_embeddings "
                               f"{c.max_position_embeddings}")
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                         embedding_init=nn.initializers.normal(0.02), name=name)
        x = embed(c.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(input_ids.shape[-1])[None])
        return self.layer_norm(c.layer_norm_eps, "LayerNorm")(x)


class BertSelfAttention(_Module):
    config: MEDConfig = MEDConfig()
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, x: jax.Array, memory: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        width = self.config.hidden_size
        q = self.dense(width, "query")(x)
        k, v = self.dense(width, "key")(memory), self.dense(width, "value")(memory)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return multi_head_attention(q, k, v, self.config.num_attention_heads, implementation=self.attention_impl,
                                    mask=mask)


class BertOutput(_Module):
    """``BertSelfOutput`` / ``BertOutput``: dense, then LayerNorm of it plus the residual."""

    config: MEDConfig = MEDConfig()

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        x = self.dense(self.config.hidden_size, "dense")(x)
        return self.layer_norm(self.config.layer_norm_eps, "LayerNorm")(x + residual)


class BertAttention(_Module):
    config: MEDConfig = MEDConfig()
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, x: jax.Array, memory: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        out = BertSelfAttention(**kw, attention_impl=self.attention_impl, name="self")(x, memory, key_mask)
        return BertOutput(**kw, name="output")(out, x)


class BertLayer(_Module):
    """Self-attention, cross-attention to the image (BLIP's "multimodal" mode), feed-forward."""

    config: MEDConfig = MEDConfig()
    attention_impl: AttentionImpl = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(kw, attention_impl=self.attention_impl)
        x = BertAttention(**attn, name="attention")(x, x, key_mask)
        x = BertAttention(**attn, name="crossattention")(x, image_embeds, None)  # all-ones image mask
        h = BertIntermediate(**kw, name="intermediate")(x)
        return BertOutput(**kw, name="output")(h, x)


class BertIntermediate(_Module):
    config: MEDConfig = MEDConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _ACTIVATIONS[self.config.hidden_act](self.dense(self.config.intermediate_size, "dense")(x))


class BertEncoder(_Module):
    config: MEDConfig = MEDConfig()
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        layer = remat(BertLayer, self.remat_policy)
        for i in range(self.config.num_hidden_layers):
            x = layer(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_impl=self.attention_impl, name=f"layer_{i}")(x, key_mask, image_embeds)
        return x


class BertModel(_Module):
    """BLIP's ``med.BertModel`` (no pooler) in multimodal mode: returns ``last_hidden_state``."""

    config: MEDConfig = MEDConfig()
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertEmbeddings(**kw, name="embeddings")(input_ids)
        return BertEncoder(**kw, attention_impl=self.attention_impl, remat_policy=self.remat_policy,
                           name="encoder")(x, attention_mask.astype(bool), image_embeds.astype(self.dtype))


class BLIP(_Module):
    """The two encoders of BLIP that ImageReward keeps (``BLIP_Pretrain`` less its unused heads)."""

    config: ImageRewardConfig = ImageRewardConfig()
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  remat_policy=self.remat_policy)
        self.visual_encoder = BLIPVisionTransformer(config=self.config.vision, **kw)
        self.text_encoder = BertModel(config=self.config.text, **kw)

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        return self.visual_encoder(pixel_values)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        return self.text_encoder(input_ids, attention_mask, image_embeds)


class RewardMLP(nn.Module):
    """ImageReward's ``MLP``: five Linear layers, no activations (Dropouts in between are identity
    at inference). Computed in float32 whatever the encoders' dtype, as the reference casts the
    feature with ``.float()``."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for index, width in zip(_MLP_LINEARS, MLP_WIDTHS):
            x = nn.Dense(width, dtype=jnp.float32, param_dtype=self.param_dtype,
                         kernel_init=nn.initializers.normal(0.02), name=f"layers_{index}")(x)
        return x


class ImageRewardModel(nn.Module):
    """``ImageReward`` in Flax.

    ``__call__(pixel_values [B, S, S, 3] CLIP-normalised NHWC, input_ids [B, T], attention_mask
    [B, T])`` -> the normalised reward [B] (float32), as ``ImageReward.score`` gives per image.
    ``apply(..., method="image_embeds" | "text_features" | "reward_from_features")`` expose the
    steps: the ViT's tokens, the text encoder's first token, the MLP head. ``remat_policy``
    ("full" or a ``jax.checkpoint_policies`` name) rematerialises each ViT block and BERT layer in
    the backward pass (ReFL differentiates through the whole model).
    """

    config: ImageRewardConfig = ImageRewardConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None

    def setup(self):
        self.blip = BLIP(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                         attention_impl=self.attention_impl, remat_policy=self.remat_policy)
        self.mlp = RewardMLP(param_dtype=self.param_dtype)

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        return self.blip.encode_image(pixel_values)

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        """The first token of the text encoder's last layer, float32 [B, hidden]."""
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise SafeJaxError(f"ImageReward: input_ids {tuple(input_ids.shape)} and attention_mask "
                               f"{tuple(attention_mask.shape)} must both be [B, T]")
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise SafeJaxError(f"ImageReward: {image_embeds.shape[0]} images but {input_ids.shape[0]} prompts")
        hidden = self.blip.encode_text(input_ids, attention_mask, image_embeds)
        return hidden[:, 0].astype(jnp.float32)

    def reward_from_features(self, features: jax.Array) -> jax.Array:
        return ((self.mlp(features)[:, 0] - REWARD_MEAN) / REWARD_STD).astype(jnp.float32)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        features = self.text_features(input_ids, attention_mask, self.image_embeds(pixel_values))
        return self.reward_from_features(features)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

def abstract_params(model: ImageRewardModel) -> dict[str, Any]:
    """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    size = model.config.vision.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, MAX_LENGTH), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), pixels, ids, ids)["params"]


def param_count(model: ImageRewardModel) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract_params(model)))


# The reference's nn.ModuleList attributes. Until safe_jax.io.convert.LIST_MODULES names them, the
# converter keeps our "blocks_0" / "layer_0" as they are, where the checkpoint has "blocks.0" /
# "layer.0"; these two rewrites translate between the spellings (and do nothing once it names them).
_LISTS = ("blocks", "layer")
_ADAPT = torch_key(("blocks_0", "layer_0", "bias")) != "blocks.0.layer.0.bias"
_CHECKPOINT_INDEX = re.compile(rf"(^|\.)({'|'.join(_LISTS)})\.(\d+)(?=\.)")
_CONVERTER_INDEX = re.compile(rf"(^|\.)({'|'.join(_LISTS)})_(\d+)(?=\.)")


def _to_converter(key: str) -> str:
    return _CHECKPOINT_INDEX.sub(r"\1\2_\3", key) if _ADAPT else key


def _to_checkpoint(text: str) -> str:
    return _CONVERTER_INDEX.sub(r"\1\2.\3", text) if _ADAPT else text


def from_state_dict(state_dict: Mapping[str, np.ndarray], model: ImageRewardModel, *, dtype: Any = None,
                    what: str = "ImageReward checkpoint") -> dict[str, Any]:
    """Flax params from an ImageReward state dict (numpy arrays, checkpoint keys).

    ``position_ids`` (must be ``arange``) and the unused contrastive heads are dropped; anything
    else missing, extra or mis-shaped is a SafeJaxError naming the tensor and ``what``.
    """
    state = dict(state_dict)
    position_ids = state.pop(POSITION_IDS, None)
    if position_ids is not None:
        n = model.config.text.max_position_embeddings
        ids = np.asarray(position_ids)
        if ids.shape != (1, n) or not np.array_equal(ids[0], np.arange(n)):
            raise SafeJaxError(f"{what}: {POSITION_IDS} must be arange({n}) of shape (1, {n}); it holds other "
                               f"values (shape {tuple(ids.shape)})")
    for key in UNUSED_HEADS:
        state.pop(key, None)
    _check_vision(state, model.config.vision, what)
    try:
        return torch_to_flax({_to_converter(k): v for k, v in state.items()}, abstract_params(model),
                             what=what, dtype=dtype)
    except SafeJaxError as e:
        raise SafeJaxError(_to_checkpoint(str(e))) from None


def _check_vision(state: Mapping[str, np.ndarray], vision: BLIPVisionConfig, what: str) -> None:
    """The reference fixes the ViT in code, not in a file: name both architectures when they differ."""
    pos, patch = state.get("blip.visual_encoder.pos_embed"), state.get("blip.visual_encoder.patch_embed.proj.weight")
    if pos is None or patch is None or np.ndim(pos) != 3 or np.ndim(patch) != 4:
        return  # the key-by-key check names what is missing or mis-shaped
    depth = len({m[1] for m in (re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k) for k in state) if m})
    found = (np.shape(pos)[2], np.shape(patch)[2], np.shape(pos)[1], depth)
    wanted = (vision.width, vision.patch_size, vision.num_patches + 1, vision.depth)
    if found != wanted:
        show = lambda w, p, n, d: f"width {w}, patch {p}, {n} tokens, {d} blocks"
        raise SafeJaxError(f"{what}: its ViT ({show(*found)}) is not the vision=... architecture asked for "
                           f"({show(*wanted)})")


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The checkpoint keys and layouts of Flax ``params`` (bitwise: only transposes); the unused
    heads and the position_ids buffer are not included."""
    return {_to_checkpoint(key): value for key, value in flax_to_torch(params).items()}
