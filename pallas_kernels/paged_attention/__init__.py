"""Paged attention and K/V writes over the unified pool. The public functions validate, then pick
the kernel or the reference."""

from __future__ import annotations

import jax

from pallas_kernels.paged_attention.reference import paged_attention_reference, write_kv_reference

__all__ = ["paged_attention", "paged_attention_reference", "write_kv", "write_kv_reference"]


def write_kv(pool, layer, k, v, write_units, *, implementation: str = "reference") -> jax.Array:
    if k.shape != v.shape or k.ndim != 4 or write_units.shape != k.shape[:2]:
        raise ValueError(f"k {k.shape}, v {v.shape}, write_units {write_units.shape} do not agree")
    if pool.ndim != 3 or pool.shape[2] != k.shape[3]:
        raise ValueError(f"pool {pool.shape} does not hold head_dim {k.shape[3]}")
    return write_kv_reference(pool, layer, k, v, write_units)


def paged_attention(
    q, pool, layer, page_tables, positions, context_lens, *, page_size: int, num_kv_heads: int,
    sliding_window: int | None = None, implementation: str = "reference",
) -> jax.Array:
    if q.ndim != 4 or q.shape[2] % num_kv_heads:
        raise ValueError(f"q {q.shape}: heads must be a multiple of num_kv_heads {num_kv_heads}")
    if pool.shape[1] % (page_size * 2 * num_kv_heads):
        raise ValueError(f"pool units {pool.shape[1]} are not whole pages of {page_size * 2 * num_kv_heads}")
    if page_tables.shape[0] != q.shape[0] or positions.shape != q.shape[:2] or context_lens.shape != q.shape[:1]:
        raise ValueError("page_tables, positions and context_lens must match q's batch")
    if implementation != "reference":
        raise ValueError(f"unknown implementation {implementation!r}")
    return paged_attention_reference(
        q, pool, layer, page_tables, positions, context_lens, page_size=page_size, num_kv_heads=num_kv_heads,
        sliding_window=sliding_window,
    )
