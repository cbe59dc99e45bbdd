"""Pure-jnp product with a column-panel weight: the oracle, and the path where the kernel is absent."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def panel_matmul_reference(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [M, K] @ W [K, n], W stored as panels [P, K, 48] (columns 48p..48p+47 in panel p)."""
    y = jnp.einsum("MK,PKJ->MPJ", x, panels, preferred_element_type=jnp.float32)  # [M, P, 48]
    return y.reshape(x.shape[0], -1)[:, :n].astype(x.dtype)
