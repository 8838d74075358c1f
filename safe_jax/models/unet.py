"""UNet2DConditionModel for Stable Diffusion 1.x, 2.x and XL, parameter-compatible with diffusers.

Takes NHWC latents. The conditioning is one pytree: the text encoding [B, L, D] for SD 1.x/2.x,
or for SDXL (``addition_embed_type="text_time"``) a dict of ``encoder_hidden_states``, the pooled
``text_embeds`` [B, P] and the micro-conditioning ``time_ids`` [B, 6] (original size, crop
top-left, target size), so samplers, CFG and losses handle both without knowing which. The config is diffusers' own ``unet/config.json``; anything in it that
this module does not implement is rejected by name instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from safe_jax.errors import SafeJaxError
from safe_jax.models import config_fields as fields
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    remat,
)

Dtype = Any

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Settings diffusers supports that we do not: the value we require, so a config using them fails
# loudly. (Their defaults are what every SD 1.x / 2.x checkpoint uses.)
_REQUIRED = {
    "center_input_sample": False, "class_embed_type": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    "dual_cross_attention": False, "only_cross_attention": False, "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default", "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1, "cross_attention_norm": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "num_class_embeds": None, "resnet_skip_time_act": False,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None, "dropout": 0.0, "addition_embed_type_num_heads": 64,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    num_attention_heads: tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    # SDXL's added conditioning: a sinusoidal projection of each time id, concatenated with the
    # pooled text embedding, through a timestep-style MLP added to the time embedding.
    addition_embed_type: str | None = None  # None | "text_time"
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def heads(self) -> tuple[int, ...]:
        # diffusers' historical naming: without num_attention_heads, attention_head_dim is the head count.
        return self.num_attention_heads or self.attention_head_dim

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], source: str = "UNet config") -> "UNetConfig":
        """From diffusers' ``unet/config.json`` dict. Every field is checked (type, range, and how
        fields fit together); ``source`` names the file in the one-line error."""
        cfg, kw, n = fields.diffusers_blocks(source, "UNet", cfg, _REQUIRED, cls.block_out_channels)
        for key in ("down_block_types", "up_block_types"):
            if key in cfg:
                kw[key] = fields.config_names(source, key, cfg[key])
        for key, minimum in (("in_channels", 1), ("out_channels", 1), ("norm_num_groups", 1), ("downsample_padding", 0)):
            if key in cfg:
                kw[key] = fields.config_int(source, key, cfg[key], minimum)
        for key in ("flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
            if key in cfg and not (key == "upcast_attention" and cfg[key] is None):  # SDXL's null = false
                kw[key] = fields.config_bool(source, key, cfg[key])
        if "freq_shift" in cfg:
            kw["freq_shift"] = fields.config_number(source, "freq_shift", cfg["freq_shift"], minimum=0)
        if "norm_eps" in cfg:
            kw["norm_eps"] = fields.config_number(source, "norm_eps", cfg["norm_eps"], positive=True)
        for key in ("time_embedding_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if key in cfg:
                kw[key] = fields.config_optional_int(source, key, cfg[key])
        if cfg.get("addition_embed_type") is not None:
            if cfg["addition_embed_type"] != "text_time":
                raise SafeJaxError(f"{source}: unsupported UNet architecture: addition_embed_type="
                                   f"{fields.show(cfg['addition_embed_type'])} (safe-jax supports None and 'text_time')")
            kw["addition_embed_type"] = "text_time"

        def one(key: str) -> int:  # an int, or a per-block list diffusers allows but that must be uniform here
            value = fields.config_int_or_ints(source, key, cfg[key])
            if isinstance(value, tuple):
                if len(set(value)) != 1:
                    raise SafeJaxError(f"{source}: unsupported UNet architecture: per-block {key}={list(value)}")
                value = value[0]
            return value

        if "layers_per_block" in cfg:
            kw["layers_per_block"] = one("layers_per_block")
        if "cross_attention_dim" in cfg:
            kw["cross_attention_dim"] = one("cross_attention_dim")
        if cfg.get("sample_size") is not None:  # [h, w] is allowed: the default image size takes h.
            # (null, diffusers' default when unset, keeps SD's 64.)
            size = fields.config_int_or_ints(source, "sample_size", cfg["sample_size"])
            kw["sample_size"] = size[0] if isinstance(size, tuple) else size
        per_block = lambda v: v if isinstance(v, tuple) else (v,) * n
        for key, default in (("transformer_layers_per_block", 1), ("attention_head_dim", 8)):
            kw[key] = per_block(fields.config_int_or_ints(source, key, cfg.get(key, default)))
        if cfg.get("num_attention_heads") is not None:
            kw["num_attention_heads"] = per_block(
                fields.config_int_or_ints(source, "num_attention_heads", cfg["num_attention_heads"]))
        config = cls(**kw)
        config.validate(source)
        return config

    def validate(self, source: str = "UNet config") -> None:
        """How the fields fit together (``from_diffusers`` has checked each one's type and range)."""
        n = len(self.block_out_channels)
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                     ("up_block_types", self.up_block_types, UP_BLOCKS)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise SafeJaxError(f"{source}: unsupported UNet architecture: {name} contains {bad[0]} "
                                   f"(supported: {', '.join(allowed)})")
            if len(types) != n:
                raise SafeJaxError(f"{source}: {name} has {len(types)} entries, block_out_channels has {n}")
        for name in ("transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise SafeJaxError(f"{source}: {name} has {len(value)} entries, block_out_channels has {n}")
        fields.config_groups_divide(source, self.norm_num_groups, self.block_out_channels)
        width = self.block_out_channels[0]
        if width % 2:
            raise SafeJaxError(f"{source}: unsupported UNet architecture: block_out_channels[0]={width} is odd "
                               "(the timestep embedding needs an even width)")
        if self.freq_shift >= width // 2:
            raise SafeJaxError(f"{source}: freq_shift={self.freq_shift} must be below block_out_channels[0] / 2 "
                               f"= {width // 2}")
        text_time = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type == "text_time":
            if None in text_time:
                raise SafeJaxError(f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                                   "projection_class_embeddings_input_dim")
            if self.addition_time_embed_dim % 2:
                raise SafeJaxError(f"{source}: addition_time_embed_dim={self.addition_time_embed_dim} must be even")
            if self.projection_class_embeddings_input_dim <= 6 * self.addition_time_embed_dim:
                raise SafeJaxError(f"{source}: projection_class_embeddings_input_dim="
                                   f"{self.projection_class_embeddings_input_dim} leaves no room for the pooled text "
                                   f"embedding beside 6 time ids of {self.addition_time_embed_dim}")
        elif text_time != (None, None):
            raise SafeJaxError(f"{source}: addition_time_embed_dim / projection_class_embeddings_input_dim are set "
                               "but addition_embed_type is not 'text_time'")
        heads_key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            has_attn = (self.down_block_types[i].startswith("CrossAttn") or i == n - 1  # the mid block
                        or self.up_block_types[n - 1 - i].startswith("CrossAttn"))
            if has_attn and c % h:
                raise SafeJaxError(f"{source}: {heads_key}={h}: {c} channels do not split into {h} attention heads")

    def to_diffusers(self) -> dict[str, Any]:
        out = {"_class_name": "UNet2DConditionModel"}
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()})
        out.update(_REQUIRED)
        return out

    @property
    def pooled_dim(self) -> int | None:
        """The width of the pooled text embedding an SDXL UNet expects (None for SD 1.x/2.x)."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    def example_conditioning(self, batch: int = 1, length: int = 1) -> Any:
        """A zero conditioning pytree of the right structure (for init and ``eval_shape``)."""
        context = jnp.zeros((batch, length, self.cross_attention_dim))
        if self.addition_embed_type != "text_time":
            return context
        return {"encoder_hidden_states": context, "text_embeds": jnp.zeros((batch, self.pooled_dim)),
                "time_ids": jnp.zeros((batch, 6))}


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' get_timestep_embedding."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    return emb



class _Block(nn.Module):
    """One down or up block: resnets, optional spatial transformers, optional resampler."""

    config: UNetConfig
    out_channels: int
    num_layers: int
    heads: int | None  # None: no cross-attention
    depth: int
    resample: str | None  # "down" | "up" | None
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, skips=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = remat(ResnetBlock2D, self.remat_policy)
        attn_cls = remat(Transformer2DModel, self.remat_policy)
        outputs = []
        for j in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet_cls(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{j}", **kw)(x, temb)
            if self.heads is not None:
                x = attn_cls(self.heads, self.out_channels // self.heads, self.depth, cfg.norm_num_groups,
                             cfg.use_linear_projection, cfg.upcast_attention, self.attention_impl,
                             name=f"attentions_{j}", **kw)(x, context)
            outputs.append(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, cfg.downsample_padding, name="downsamplers_0", **kw)(x)
            outputs.append(x)
        elif self.resample == "up":  # to the size of the next skip connection, as diffusers' upsample_size
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, skips[-1].shape[1:3])
        return x, outputs


class UNet2DConditionModel(nn.Module):
    config: UNetConfig
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, conditioning: Any) -> jax.Array:
        """sample [B, H, W, C_in] NHWC, timesteps [B] or scalar, conditioning: the text encoding
        [B, L, D], or for SDXL a dict with it as ``encoder_hidden_states`` plus ``text_embeds``
        [B, P] and ``time_ids`` [B, 6] (see the module docstring)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(attention_impl=self.attention_impl, remat_policy=self.remat_policy, **kw)
        n = len(cfg.block_out_channels)
        text_time = cfg.addition_embed_type == "text_time"
        if text_time != isinstance(conditioning, Mapping):
            raise SafeJaxError("this UNet needs " + ("a dict of encoder_hidden_states, text_embeds and time_ids"
                                                     if text_time else "the text encoding array") + " as conditioning")
        context = (conditioning["encoder_hidden_states"] if text_time else conditioning).astype(self.dtype)

        t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        time_dim = cfg.time_embedding_dim or cfg.block_out_channels[0] * 4
        temb = temb.astype(self.dtype)
        temb = _TimestepEmbedding(time_dim, name="time_embedding", **kw)(temb)
        if text_time:  # diffusers' add_time_proj + add_embedding, added to the time embedding
            time_ids = conditioning["time_ids"]
            b = sample.shape[0]
            ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(b, -1)
            added = jnp.concatenate([conditioning["text_embeds"].astype(jnp.float32), ids], axis=-1)
            temb = temb + _TimestepEmbedding(time_dim, name="add_embedding", **kw)(added.astype(self.dtype))

        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(sample.astype(self.dtype))
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            has_attn = block_type.startswith("CrossAttn")
            x, outs = _Block(cfg, cfg.block_out_channels[i], cfg.layers_per_block,
                             cfg.heads[i] if has_attn else None, cfg.transformer_layers_per_block[i],
                             "down" if i < n - 1 else None, name=f"down_blocks_{i}", **blk)(x, temb, context)
            skips += outs

        x = _MidBlock(cfg, cfg.heads[-1], cfg.transformer_layers_per_block[-1], name="mid_block", **blk)(x, temb, context)

        rev_channels = cfg.block_out_channels[::-1]
        rev_heads, rev_depth = cfg.heads[::-1], cfg.transformer_layers_per_block[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            has_attn = block_type.startswith("CrossAttn")
            x, _ = _Block(cfg, rev_channels[i], cfg.layers_per_block + 1, rev_heads[i] if has_attn else None,
                          rev_depth[i], "up" if i < n - 1 else None, name=f"up_blocks_{i}", **blk)(
                x, temb, context, skips)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class _TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(nn.Dense(self.features, name="linear_1", **kw)(x)))


class _MidBlock(nn.Module):
    config: UNetConfig
    heads: int
    depth: int
    attention_impl: AttentionImpl = None
    remat_policy: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        resnet_cls = remat(ResnetBlock2D, self.remat_policy)
        attn_cls = remat(Transformer2DModel, self.remat_policy)
        x = resnet_cls(c, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(x, temb)
        x = attn_cls(self.heads, c // self.heads, self.depth, cfg.norm_num_groups, cfg.use_linear_projection,
                     cfg.upcast_attention, self.attention_impl, name="attentions_0", **kw)(x, context)
        return resnet_cls(c, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(x, temb)
