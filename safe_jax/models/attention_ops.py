"""The one attention kernel every model here calls, so the implementation is chosen in one place."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn"] | None


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    *,
    implementation: AttentionImpl = None,
    upcast: bool = False,
    is_causal: bool = False,
    mask: jax.Array | None = None,
) -> jax.Array:
    """softmax(q kᵀ/√d) v over ``heads`` heads; inputs and output are [B, T, heads·d].

    ``mask`` (boolean, broadcastable to [B, heads, T, S]; True = attend) combines with ``is_causal``.

    ``implementation`` goes to ``jax.nn.dot_product_attention``: "cudnn" for the fused GPU
    kernel (bf16/fp16 only), "xla" anywhere, None lets JAX choose. ``upcast`` computes in fp32,
    as diffusers' ``upcast_attention`` does for SD 2.x 768-v.
    """
    b, tq, inner = q.shape
    d = inner // heads
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)
    out = jax.nn.dot_product_attention(
        split(q), split(k), split(v), mask=mask, is_causal=is_causal, implementation=implementation
    )
    return out.reshape(b, tq, inner).astype(out_dtype)
