"""Attention over a contiguous per-sequence KV cache (the reference path; the paged engine has its own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def contiguous_attention(
    q: jax.Array,  # [B, T, Hq, Dh] (rope applied)
    k: jax.Array,  # [B, T, Hkv, Dh] (rope applied)
    v: jax.Array,  # [B, T, Hkv, Dh]
    cache_k: jax.Array,  # [B, S, Hkv, Dh]
    cache_v: jax.Array,  # [B, S, Hkv, Dh]
    positions: jax.Array,  # [B, T] int32; a position >= S marks padding: not written, output unused
    sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [B, T, Hq*Dh], cache_k, cache_v
    """Write this step's K/V at their positions, then attend causally over the whole cache row."""
    b, t, hq, dh = q.shape
    s, hkv = cache_k.shape[1], cache_k.shape[2]
    batch_index = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    cache_k = cache_k.at[batch_index, positions].set(k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[batch_index, positions].set(v.astype(cache_v.dtype), mode="drop")

    qg = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, cache_k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(dh)))
    key_pos = jnp.arange(s)[None, None, :]  # [1, 1, S]
    query_pos = positions[:, :, None]  # [B, T, 1]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask = mask & (query_pos - key_pos < sliding_window)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, cache_v.astype(q.dtype))
    return out.reshape(b, t, hq * dh), cache_k, cache_v
