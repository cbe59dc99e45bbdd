"""Pure-jnp paged attention over the unified pool: the oracle and the path on every backend.

Pool: [L, U, Dh] (U = num_pages * page_units, page_units = page_size * 2 * Hkv). Token slot s of
page p keeps its K heads at units p*page_units + s*2*Hkv + [0, Hkv) and its V heads right after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def write_kv_reference(
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    k: jax.Array,  # [B, T, Hkv, Dh]
    v: jax.Array,  # [B, T, Hkv, Dh]
    write_units: jax.Array,  # [B, T] int32 first unit of each token's K; >= U for padding (dropped)
) -> jax.Array:
    hkv = k.shape[2]
    units_k = write_units[..., None] + jnp.arange(hkv, dtype=write_units.dtype)  # [B, T, Hkv]
    pool = pool.at[layer, units_k].set(k.astype(pool.dtype), mode="drop")
    return pool.at[layer, units_k + hkv].set(v.astype(pool.dtype), mode="drop")


def paged_attention_reference(
    q: jax.Array,  # [B, T, Hq, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32 (unused entries: 0, the zero page)
    positions: jax.Array,  # [B, T] int32 position of each query
    context_lens: jax.Array,  # [B] int32 tokens in the cache after this step's writes
    *,
    page_size: int,
    num_kv_heads: int,
    sliding_window: int | None = None,
) -> jax.Array:  # [B, T, Hq, Dh]
    b, t, hq, dh = q.shape
    n_layers, units, _ = pool.shape
    hkv = num_kv_heads
    page_units = page_size * 2 * hkv
    p = page_tables.shape[1]
    pages = pool.reshape(n_layers, units // page_units, page_units, dh)[layer, page_tables]  # [B, P, PU, Dh]
    kv = pages.reshape(b, p * page_size, 2, hkv, dh)
    keys, values = kv[:, :, 0], kv[:, :, 1]  # [B, S, Hkv, Dh]

    qg = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(dh)))
    key_pos = jnp.arange(p * page_size)[None, None, :]  # [1, 1, S]
    query_pos = positions[:, :, None]  # [B, T, 1]
    mask = (key_pos <= query_pos) & (key_pos < context_lens[:, None, None])
    if sliding_window is not None:
        mask = mask & (query_pos - key_pos < sliding_window)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values.astype(q.dtype))
    return out.reshape(b, t, hq, dh)
