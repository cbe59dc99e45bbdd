"""Paged decode attention on the CPU (decode_attention.cc), reading pages in place from the unified
pool. Same contract as pallas_kernels.paged_attention for one query per sequence, whose reference is
the oracle; rows with no real token (padding) get finite values that nothing reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import kernel_available


def decode_attention_supported(q: jax.Array, pool: jax.Array) -> bool:
    """The kernel runs here: one query per sequence, float32, the CPU library built."""
    return q.shape[1] == 1 and q.dtype == jnp.float32 and pool.dtype == jnp.float32 and kernel_available()


def decode_attention(
    q: jax.Array,  # [B, 1, Hq, Dh]
    k_new: jax.Array,  # [B, 1, Hkv, Dh]
    v_new: jax.Array,  # [B, 1, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32
    positions: jax.Array,  # [B, 1] int32
    cached_lens: jax.Array,  # [B] int32
    *,
    page_size: int,
    sliding_window: int | None = None,
) -> jax.Array:  # [B, 1, Hq, Dh]
    out = jax.ShapeDtypeStruct(q.shape[:1] + q.shape[2:], jnp.float32)
    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    y = jax.ffi.ffi_call("jlora_decode_attention", out)(
        q[:, 0],
        k_new[:, 0].astype(jnp.float32),
        v_new[:, 0].astype(jnp.float32),
        pool,
        jnp.asarray(layer, jnp.int32).reshape(()),
        i32(page_tables),
        i32(positions[:, 0]),
        i32(cached_lens),
        page_size=np.int64(page_size),
        window=np.int64(sliding_window or 0),
    )
    return y[:, None]
