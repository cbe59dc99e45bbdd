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
