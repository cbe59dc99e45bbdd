"""Paged attention and K/V writes over the unified pool. The public functions validate, then pick
the kernel or the reference."""

from __future__ import annotations

import jax

from pallas_kernels.paged_attention.reference import paged_attention_reference, write_kv_reference

__all__ = ["paged_attention", "paged_attention_reference", "write_kv", "write_kv_reference"]


def write_kv(pool, k, v, write_units, *, implementation: str = "reference") -> jax.Array:
    if k.shape != v.shape or k.ndim != 5 or write_units.shape != k.shape[1:3]:
        raise ValueError(f"k {k.shape}, v {v.shape} must be [L, B, T, Hkv, Dh]; write_units {write_units.shape} [B, T]")
    if pool.ndim != 3 or pool.shape[2] != k.shape[4] or pool.shape[0] != k.shape[0]:
        raise ValueError(f"pool {pool.shape} does not match k {k.shape}")
    if implementation != "reference":
        raise ValueError(f"unknown implementation {implementation!r}")
    return write_kv_reference(pool, k, v, write_units)


def paged_attention(
    q, k_new, v_new, pool, layer, page_tables, positions, cached_lens, new_lens, *, page_size: int,
    sliding_window: int | None = None, implementation: str = "reference",
) -> jax.Array:
    if q.ndim != 4 or k_new.ndim != 4 or q.shape[2] % k_new.shape[2]:
        raise ValueError(f"q {q.shape} / k {k_new.shape}: heads must be a multiple of kv heads")
    if pool.shape[1] % (page_size * 2 * k_new.shape[2]):
        raise ValueError(f"pool units {pool.shape[1]} are not whole pages of {page_size * 2 * k_new.shape[2]}")
    b = q.shape[0]
    if page_tables.shape[0] != b or positions.shape != q.shape[:2] or cached_lens.shape != (b,) or new_lens.shape != (b,):
        raise ValueError("page_tables, positions, cached_lens and new_lens must match q's batch")
    if implementation != "reference":
        raise ValueError(f"unknown implementation {implementation!r}")
    return paged_attention_reference(
        q, k_new, v_new, pool, layer, page_tables, positions, cached_lens, new_lens,
        page_size=page_size, sliding_window=sliding_window,
    )
