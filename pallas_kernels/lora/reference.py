"""Pure-jnp gathered LoRA over rank rows: the oracle and the path for every backend without a kernel.

An adapter of rank r on a projection owns r rows of that projection's pool: row j of A_pool is the
j-th row of A^T (width h_in), row j of B_pool is the j-th row of B (width h_out, scaling folded in).
A step lists (token, row) pairs, one per rank row of each token's adapter, so the work is the sum
of the ranks actually used: mixed ranks cost their own rank, and slots that no token uses cost nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_rows_reference(
    x: jax.Array,  # [N, H_in] activations, one row per token
    a_pool: jax.Array,  # [R, H_in] A^T rows of every resident adapter
    b_pool: jax.Array,  # [R, H_out] B rows (scaling folded in)
    token_index: jax.Array,  # [K] int32 token of each pair
    row_index: jax.Array,  # [K] int32 pool row of each pair; padding pairs point at a zero row
) -> jax.Array:  # [N, H_out] the LoRA delta, in x.dtype
    """delta[n] = sum over pairs k with token_index[k] == n of (x[n] . a_pool[row_k]) * b_pool[row_k]."""
    x_rows = jnp.take(x, token_index, axis=0, mode="clip")  # [K, H_in]
    a_rows = jnp.take(a_pool, row_index, axis=0, mode="clip")  # [K, H_in]
    shrunk = jnp.einsum("KH,KH->K", x_rows, a_rows, preferred_element_type=jnp.float32)  # [K]
    b_rows = jnp.take(b_pool, row_index, axis=0, mode="clip").astype(jnp.float32)  # [K, H_out]
    delta = jax.ops.segment_sum(shrunk[:, None] * b_rows, token_index, num_segments=x.shape[0])
    return delta.astype(x.dtype)


def _rows_from_pool(pool: jax.Array, layer: jax.Array, starts: jax.Array, width: int) -> jax.Array:
    """Rows of `width` elements that start at unit `starts` of the pool's layer: [*starts.shape, width]."""
    dh = pool.shape[2]
    n_units = -(-width // dh)
    units = starts[..., None] + jnp.arange(n_units, dtype=starts.dtype)  # [..., n_units]
    rows = pool[layer, units]  # [..., n_units, Dh]
    return rows.reshape(*starts.shape, n_units * dh)[..., :width]


def gather_rows(
    pool: jax.Array, layer: jax.Array, a_start: jax.Array, b_start: jax.Array, h_in: int, h_out: int
):
    """The A^T and B rows named by a_start / b_start ([...] unit indices): ([..., H_in], [..., H_out])."""
    return _rows_from_pool(pool, layer, a_start, h_in), _rows_from_pool(pool, layer, b_start, h_out)


def apply_decode_rows(
    x: jax.Array, a_rows: jax.Array, b_rows: jax.Array, token_index: jax.Array
) -> jax.Array:
    """BGMV on gathered rows. x [N, H_in]; a_rows [K, H_in]; b_rows [K, H_out]; token_index [K]."""
    x_rows = jnp.take(x, token_index, axis=0, mode="clip")
    shrunk = jnp.einsum("KH,KH->K", x_rows, a_rows.astype(x.dtype), preferred_element_type=jnp.float32)
    delta = jax.ops.segment_sum(
        shrunk[:, None] * b_rows.astype(jnp.float32), token_index, num_segments=x.shape[0]
    )
    return delta.astype(x.dtype)


def apply_prefill_rows(x: jax.Array, a_rows: jax.Array, b_rows: jax.Array) -> jax.Array:
    """SGMV on gathered rows. x [B, T, H_in]; a_rows [B, R, H_in]; b_rows [B, R, H_out]."""
    shrunk = jnp.einsum("BTH,BRH->BTR", x, a_rows.astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("BTR,BRO->BTO", shrunk, b_rows.astype(jnp.float32)).astype(x.dtype)


def lora_decode_reference(
    x: jax.Array,  # [N, H_in] one row per token
    pool: jax.Array,  # [L, U, Dh] the unified pool
    layer: jax.Array,  # [] int32
    token_index: jax.Array,  # [K] int32 token of each (token, rank row) pair
    a_start: jax.Array,  # [K] int32 first unit of the pair's A^T row; 0 (zero page) for padding
    b_start: jax.Array,  # [K] int32 first unit of the pair's B row (scaling folded in)
    h_out: int,
) -> jax.Array:  # [N, H_out]
    """BGMV: every token its own adapter; the work is the sum of the ranks used, read from the pool."""
    a_rows, b_rows = gather_rows(pool, layer, a_start, b_start, x.shape[1], h_out)
    return apply_decode_rows(x, a_rows, b_rows, token_index)


def lora_decode_shrink_reference(
    x: jax.Array, pool: jax.Array, layer: jax.Array, token_index: jax.Array, a_start: jax.Array
) -> jax.Array:  # [K] float32
    """The shrink half of BGMV: x[token] . A row for every pair (padding pairs read the zero page)."""
    a_rows = _rows_from_pool(pool, layer, a_start, x.shape[1])
    x_rows = jnp.take(x, token_index, axis=0, mode="clip")
    return jnp.einsum("KH,KH->K", x_rows, a_rows.astype(x.dtype), preferred_element_type=jnp.float32)


def lora_decode_expand_reference(
    shrunk: jax.Array,  # [K] float32
    pool: jax.Array,
    layer: jax.Array,
    token_index: jax.Array,  # [K] int32
    b_start: jax.Array,  # [K] int32
    h_out: int,
    n_tokens: int,
    dtype: jnp.dtype,
) -> jax.Array:  # [N, H_out]
    """The expand half of BGMV: each token's sum of shrunk * B row."""
    b_rows = _rows_from_pool(pool, layer, b_start, h_out).astype(jnp.float32)
    return jax.ops.segment_sum(shrunk[:, None] * b_rows, token_index, num_segments=n_tokens).astype(dtype)


def lora_prefill_reference(
    x: jax.Array,  # [B, T, H_in] each sequence's chunk uses one adapter
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [B, R] int32 first unit of each A^T row of the sequence's adapter (0: padding)
    b_start: jax.Array,  # [B, R] int32
    h_out: int,
) -> jax.Array:  # [B, T, H_out]
    """SGMV: tokens grouped by sequence (one adapter each); rows padded to the step's rank bucket R."""
    a_rows, b_rows = gather_rows(pool, layer, a_start, b_start, x.shape[2], h_out)
    return apply_prefill_rows(x, a_rows, b_rows)
