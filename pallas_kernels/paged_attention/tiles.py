"""Helpers shared by the attention kernels (Triton lowering): where a key sits in the pool, tensor-core
dots, and one online-softmax step over a block of keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

NEG_INF = -1e30


def key_units(
    pt_ref, b, h, kpos: jax.Array, *, page_size: int, page_units: int, n_kv: int, n_table: int
) -> jax.Array:
    """Pool unit of KV head h's key at each position kpos of sequence b (its value is n_kv units on);
    positions past the page table read its last entry (they are masked by the caller)."""
    pages = pt_ref[b, jnp.minimum(kpos // page_size, n_table - 1)]
    return pages * page_units + (kpos % page_size) * (2 * n_kv) + h


def tile_dot(a: jax.Array, b: jax.Array, *, f32: bool, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) with float32 accumulation; f32: exact float32 inputs (no TF32)."""
    if f32:
        return pltriton.dot(a.astype(jnp.float32), b.astype(jnp.float32), trans_b=trans_b, allow_tf32=False)
    return pltriton.dot(a, b.astype(a.dtype), trans_b=trans_b)


def online_softmax_step(
    carry, q: jax.Array, kt: jax.Array, vt: jax.Array, ok: jax.Array, *, scale: float, f32: bool
):
    """carry (m [R], denom [R], acc [R, Dh]) after the keys kt/vt [BK, Dh]; ok [R, BK] (or [BK]) masks."""
    m, denom, acc = carry
    s = jnp.where(ok, tile_dot(q, kt, f32=f32, trans_b=True) * scale, NEG_INF)  # [R, BK]
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    return (
        m_new,
        denom * alpha + jnp.sum(p, axis=1),
        acc * alpha[:, None] + tile_dot(p.astype(kt.dtype), vt, f32=f32),
    )
