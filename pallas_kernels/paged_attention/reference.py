"""Pure-jnp paged attention over the unified pool: the oracle and the path on every backend.

Pool: [L, U, Dh] (U = num_pages * page_units, page_units = page_size * 2 * Hkv). Token slot s of
page p keeps its K heads at units p*page_units + s*2*Hkv + [0, Hkv) and its V heads right after.

A step's own K/V are not in the pool while its layers run: attention reads the cached pages plus the
step's K/V directly, and write_kv stores all layers' new K/V in one in-place scatter afterwards. The
pool is read-only inside the layer loop, so XLA never has to keep two versions of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _kv_units_and_rows(k, v, write_units, dtype) -> tuple[jax.Array, jax.Array]:
    """The units each token's K and V heads go to ([B, T, 2 Hkv]: K's, then V's) and the rows written
    there ([..., B, T, 2 Hkv, Dh]). K and V go in one scatter: a read of the pool that feeds either is
    then ordered before the write (with two, XLA on CPU copies the pool to keep the V side's reads
    away from the K write)."""
    hkv = k.shape[-2]
    units = write_units[..., None] + jnp.arange(2 * hkv, dtype=write_units.dtype)
    return units, jnp.concatenate([k, v], axis=-2).astype(dtype)


def write_kv_reference(
    pool: jax.Array,  # [L, U, Dh]
    k: jax.Array,  # [L, B, T, Hkv, Dh] this step's keys, every layer
    v: jax.Array,  # [L, B, T, Hkv, Dh]
    write_units: jax.Array,  # [B, T] int32 first unit of each token's K; >= U for padding (dropped)
) -> jax.Array:
    units, kv = _kv_units_and_rows(k, v, write_units, pool.dtype)
    return pool.at[:, units].set(kv, mode="drop")


def write_kv_layer_reference(
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    k: jax.Array,  # [B, T, Hkv, Dh] this step's keys of one layer
    v: jax.Array,  # [B, T, Hkv, Dh]
    write_units: jax.Array,  # [B, T] int32 first unit of each token's K; >= U for padding (dropped)
) -> jax.Array:
    units, kv = _kv_units_and_rows(k, v, write_units, pool.dtype)
    return pool.at[layer, units].set(kv, mode="drop")


def paged_attention_reference(
    q: jax.Array,  # [B, T, Hq, Dh]
    k_new: jax.Array,  # [B, T, Hkv, Dh] this step's keys (not yet in the pool)
    v_new: jax.Array,  # [B, T, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32 (unused entries: 0, the zero page)
    positions: jax.Array,  # [B, T] int32 position of each query (and of each new key)
    cached_lens: jax.Array,  # [B] int32 tokens already in the pool before this step
    new_lens: jax.Array,  # [B] int32 real tokens of this step (the rest of T is padding)
    *,
    page_size: int,
    sliding_window: int | None = None,
) -> jax.Array:  # [B, T, Hq, Dh]
    b, t, hq, dh = q.shape
    hkv = k_new.shape[2]
    n_layers, units, _ = pool.shape
    page_units = page_size * 2 * hkv
    p = page_tables.shape[1]
    pages = pool.reshape(n_layers, units // page_units, page_units, dh)[layer, page_tables]  # [B, P, PU, Dh]
    kv = pages.reshape(b, p * page_size, 2, hkv, dh)
    keys = jnp.concatenate([kv[:, :, 0].astype(q.dtype), k_new.astype(q.dtype)], axis=1)  # [B, S+T, Hkv, Dh]
    values = jnp.concatenate([kv[:, :, 1].astype(q.dtype), v_new.astype(q.dtype)], axis=1)

    cached_pos = jnp.broadcast_to(jnp.arange(p * page_size)[None], (b, p * page_size))
    key_pos = jnp.concatenate([cached_pos, positions], axis=1)  # [B, S+T]
    key_ok = jnp.concatenate(
        [cached_pos < cached_lens[:, None], jnp.arange(t)[None] < new_lens[:, None]], axis=1
    )  # [B, S+T]
    mask = key_ok[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None])  # [B, T, S+T]
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - key_pos[:, None, :] < sliding_window)

    qg = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(dh)))
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values)
    return out.reshape(b, t, hq, dh)
