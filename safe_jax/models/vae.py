"""AutoencoderKL (the Stable Diffusion VAE), parameter-compatible with diffusers. NHWC images in [-1, 1]."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from safe_jax.errors import SafeJaxError
from safe_jax.models import config_fields as fields
from safe_jax.models.attention_ops import AttentionImpl
from safe_jax.models.blocks import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D, conv, group_norm

Dtype = Any

_REQUIRED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
             "mid_block_add_attention": True, "latents_mean": None, "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], source: str = "VAE config") -> "VAEConfig":
        """From diffusers' ``vae/config.json`` dict. Every field is checked (type, range, and how
        fields fit together); ``source`` names the file in the one-line error."""
        cfg, kw, n = fields.diffusers_blocks(source, "VAE", cfg, _REQUIRED, cls.block_out_channels)
        kw["down_block_types"] = fields.config_names(source, "down_block_types",
                                                 cfg.get("down_block_types", ("DownEncoderBlock2D",) * n))
        kw["up_block_types"] = fields.config_names(source, "up_block_types",
                                               cfg.get("up_block_types", ("UpDecoderBlock2D",) * n))
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            if key in cfg:
                kw[key] = fields.config_int(source, key, cfg[key])
        if cfg.get("sample_size") is not None:  # diffusers allows [h, w]; null keeps the default
            size = fields.config_int_or_ints(source, "sample_size", cfg["sample_size"])
            kw["sample_size"] = size[0] if isinstance(size, tuple) else size
        if "scaling_factor" in cfg:
            kw["scaling_factor"] = fields.config_number(source, "scaling_factor", cfg["scaling_factor"], positive=True)
        if cfg.get("shift_factor") is not None:
            kw["shift_factor"] = fields.config_number(source, "shift_factor", cfg["shift_factor"])
        if "force_upcast" in cfg:
            kw["force_upcast"] = fields.config_bool(source, "force_upcast", cfg["force_upcast"])
        config = cls(**kw)
        config.validate(source)
        return config

    def validate(self, source: str = "VAE config") -> None:
        """How the fields fit together (``from_diffusers`` has checked each one's type and range)."""
        n = len(self.block_out_channels)
        for name, types, allowed in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                     ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if any(t != allowed for t in types) or len(types) != n:
                raise SafeJaxError(f"{source}: unsupported VAE architecture: {name}={fields.show(list(types), 200)} "
                                   f"(need {n} x {allowed}, one per block_out_channels entry)")
        fields.config_groups_divide(source, self.norm_num_groups, self.block_out_channels)

    def to_diffusers(self) -> dict[str, Any]:
        out = {"_class_name": "AutoencoderKL", "act_fn": "silu"}
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()})
        out.update(_REQUIRED)
        return out


class _MidBlock(nn.Module):
    groups: int
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, 1e-6, name="resnets_0", **kw)(x)
        x = SpatialSelfAttention(self.groups, 1e-6, self.attention_impl, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, self.groups, 1e-6, name="resnets_1", **kw)(x)


class _CoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    resample: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        for i, c in enumerate(cfg.block_out_channels):
            x = _CoderBlock(c, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < n - 1 else None,
                            name=f"down_blocks_{i}", **kw)(x)
        x = _MidBlock(cfg.norm_num_groups, self.attention_impl, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rev = cfg.block_out_channels[::-1]
        x = conv(rev[0], 3, name="conv_in", **kw)(z)
        x = _MidBlock(cfg.norm_num_groups, self.attention_impl, name="mid_block", **kw)(x)
        for i, c in enumerate(rev):
            x = _CoderBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < len(rev) - 1 else None,
                            name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """``encode`` gives the diagonal Gaussian posterior (mean, logvar); ``decode`` maps latents back.

    Neither applies ``scaling_factor``: ``latents = (sample - shift) * scaling_factor`` is the
    caller's step, exactly as in diffusers, so the two can be checked against each other.
    """

    config: VAEConfig
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.config, self.attention_impl, **kw)
        self.decoder = Decoder(self.config, self.attention_impl, **kw)
        self.quant_conv = conv(2 * self.config.latent_channels, 1, name=None, **kw)
        self.post_quant_conv = conv(self.config.latent_channels, 1, name=None, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruct through the posterior mean; used by init to create every parameter."""
        return self.decode(self.encode(x)[0])


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
