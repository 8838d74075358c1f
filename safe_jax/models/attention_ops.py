"""The one attention kernel every model here calls, so the implementation is chosen in one place."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn"] | None

# On CPU, XLA materialises and transposes the whole [B, heads, T, T] score tensor; for long
# sequences (SD's 64×64 and 32×32 latents) computing it a block of queries at a time, heads first,
# and recomputing each block in the backward pass is about 4× faster there and needs T/CHUNK
# times less memory. Softmax rows are independent, so the result is the same up to rounding.
CHUNK, CHUNK_MIN_LENGTH = 256, 512


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
    kernel (bf16/fp16 only), "xla" anywhere, None lets JAX choose (on CPU, long unmasked
    sequences take the query-chunked path above). ``upcast`` computes in fp32, as diffusers'
    ``upcast_attention`` does for SD 2.x 768-v.
    """
    b, tq, inner = q.shape
    d = inner // heads
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)
    if (implementation is None and mask is None and not is_causal and tq >= CHUNK_MIN_LENGTH
            and tq % CHUNK == 0 and jax.default_backend() == "cpu"):
        out = _query_chunked(split(q), split(k), split(v))
    else:
        out = jax.nn.dot_product_attention(
            split(q), split(k), split(v), mask=mask, is_causal=is_causal, implementation=implementation
        )
    return out.reshape(b, tq, inner).astype(out_dtype)


def _query_chunked(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[B, T, H, d] attention, CHUNK queries at a time, each block rematerialised in the backward."""
    b, t, h, d = q.shape
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, H, T, d]
    qh = heads_first(q) * jnp.asarray(d ** -0.5, q.dtype)
    kh, vh = heads_first(k), heads_first(v)
    blocks = qh.reshape(b, h, t // CHUNK, CHUNK, d).transpose(2, 0, 1, 3, 4)  # [n, B, H, C, d]

    @jax.checkpoint
    def block(qb: jax.Array) -> jax.Array:
        scores = jnp.einsum("bhqd,bhkd->bhqk", qb, kh, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, vh)

    out = jax.lax.map(block, blocks)  # [n, B, H, C, d]
    return out.transpose(1, 0, 3, 2, 4).reshape(b, t, h, d)
