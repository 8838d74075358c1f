"""Building blocks shared by the UNet and the VAE, named after their diffusers counterparts.

Everything is NHWC (the layout XLA prefers on TPU and GPU); the PyTorch side is NCHW and the
conversion in ``safe_jax.io.convert`` transposes the weights. Every module takes a compute ``dtype``
and a ``param_dtype``: parameters stay fp32 while activations run in bf16 on accelerators.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safe_jax.errors import SafeJaxError
from safe_jax.models.attention_ops import AttentionImpl, multi_head_attention

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    # use_fast_variance=False: E[(x-μ)²] like PyTorch, not E[x²]-μ², which loses digits in fp32.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str,
         stride: int = 1, padding: int | None = None) -> nn.Conv:
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype, name=name)


def remat(cls, policy: str | None):
    """Wrap a module class in jax.checkpoint with a named policy ("full" saves nothing)."""
    if policy is None or policy == "none":
        return cls
    name = "nothing_saveable" if policy == "full" else policy
    if not hasattr(jax.checkpoint_policies, name):
        raise SafeJaxError(f"unknown remat policy {policy!r}: use 'none', 'full' or a jax.checkpoint_policies name")
    return nn.remat(cls, policy=getattr(jax.checkpoint_policies, name))


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 conv. ``padding=0`` is the VAE's variant: pad right/bottom by one first."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, stride=2, padding=self.padding, name="conv",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling, then a conv.

    ``size`` (H, W) is the skip connection's size: 2x the input, except where a latent side is not
    a multiple of the UNet's total downsampling (stride-2 convs round up, so 60 → 30 → 15 → 8 must
    come back as 8 → 15). There, like diffusers (``upsample_size``), it is torch's "nearest" rule
    ``src = floor(dst · in / out)``.
    """

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        h, w = x.shape[1:3]
        if size is None or tuple(size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = jnp.take(jnp.take(x, _nearest_index(h, size[0]), axis=1), _nearest_index(w, size[1]), axis=2)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="nearest", size=n_out)'s source rows: the scale is a
    float32 ``n_in / n_out``, the index ``min(floor(i · scale), n_in − 1)``."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


class Attention(nn.Module):
    """diffusers' ``Attention`` for the UNet: q/k/v without bias, output projection with bias."""

    heads: int
    dim_head: int
    upcast: bool = False
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        q = nn.Dense(inner, use_bias=False, name="to_q", **kw)(x)
        k = nn.Dense(inner, use_bias=False, name="to_k", **kw)(context)
        v = nn.Dense(inner, use_bias=False, name="to_v", **kw)(context)
        out = multi_head_attention(q, k, v, self.heads, implementation=self.attention_impl, upcast=self.upcast)
        return nn.Dense(x.shape[-1], name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.inner_dim * 2, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)  # net.1 is dropout: no weights


class BasicTransformerBlock(nn.Module):
    heads: int
    dim_head: int
    upcast: bool = False
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, upcast=self.upcast,
                    attention_impl=self.attention_impl, **kw)
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)
        x = x + Attention(name="attn1", **attn)(ln("norm1")(x))
        x = x + Attention(name="attn2", **attn)(ln("norm2")(x), context)
        return x + FeedForward(name="ff", **kw)(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    """The UNet's spatial transformer: norm, project in, transformer blocks, project out, residual."""

    heads: int
    dim_head: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        proj = (lambda n, name: nn.Dense(n, name=name, **kw)) if self.use_linear_projection \
            else (lambda n, name: conv(n, 1, name=name, **kw))
        y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
        for i in range(self.depth):
            y = BasicTransformerBlock(self.heads, self.dim_head, self.upcast, self.attention_impl,
                                      name=f"transformer_blocks_{i}", **kw)(y, context)
        y = proj(c, "proj_out")(y.reshape(b, h, w, inner))
        return y + x


class SpatialSelfAttention(nn.Module):
    """The VAE's mid-block attention over all pixels (one head of full width, biases everywhere)."""

    groups: int = 32
    eps: float = 1e-6
    attention_impl: AttentionImpl = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, self.eps, name="group_norm", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x).reshape(b, h * w, c)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (nn.Dense(c, name=n, **kw)(y) for n in ("to_q", "to_k", "to_v"))
        y = multi_head_attention(q, k, v, 1, implementation=self.attention_impl, upcast=True)
        y = nn.Dense(c, name="to_out_0", **kw)(y)
        return x + y.reshape(b, h, w, c)
