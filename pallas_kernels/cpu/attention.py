"""Paged attention on the CPU (paged_attention.cc), reading K/V pages in place from the unified pool.
Same contract as pallas_kernels.paged_attention, whose reference is the oracle, for every row with a
real token; padding rows (past new_lens) get zeros that nothing reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import kernel_available, require_kernels


def attention_supported(q: jax.Array, pool: jax.Array) -> bool:
    """The kernel runs here: float32 queries and pool, the CPU library built."""
    return q.dtype == jnp.float32 and pool.dtype == jnp.float32 and kernel_available()


def paged_attention(
    q: jax.Array,  # [B, T, Hq, Dh]
    k_new: jax.Array,  # [B, T, Hkv, Dh]
    v_new: jax.Array,  # [B, T, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32
    positions: jax.Array,  # [B, T] int32
    cached_lens: jax.Array,  # [B] int32
    new_lens: jax.Array,  # [B] int32
    *,
    page_size: int,
    sliding_window: int | None = None,
) -> jax.Array:  # [B, T, Hq, Dh] float32
    require_kernels()
    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    return jax.ffi.ffi_call("jlora_paged_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q,
        k_new.astype(jnp.float32),
        v_new.astype(jnp.float32),
        pool,
        jnp.asarray(layer, jnp.int32).reshape(()),
        i32(page_tables),
        i32(positions),
        i32(cached_lens),
        i32(new_lens),
        page_size=np.int64(page_size),
        window=np.int64(sliding_window or 0),
    )
