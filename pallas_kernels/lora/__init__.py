"""Gathered LoRA shrink+expand. The public function validates, then picks the kernel or the reference."""

from __future__ import annotations

import jax

from pallas_kernels.lora.reference import lora_rows_reference

__all__ = ["lora_rows", "lora_rows_reference"]


def lora_rows(
    x: jax.Array,
    a_pool: jax.Array,
    b_pool: jax.Array,
    token_index: jax.Array,
    row_index: jax.Array,
    *,
    implementation: str = "reference",
) -> jax.Array:
    """The LoRA delta of every token (see reference.py for the layout). Shapes are checked here."""
    if x.ndim != 2 or a_pool.ndim != 2 or b_pool.ndim != 2:
        raise ValueError(f"x, a_pool, b_pool must be 2-D; got {x.shape}, {a_pool.shape}, {b_pool.shape}")
    if a_pool.shape[1] != x.shape[1]:
        raise ValueError(f"a_pool width {a_pool.shape[1]} != x width {x.shape[1]}")
    if a_pool.shape[0] != b_pool.shape[0]:
        raise ValueError(f"a_pool rows {a_pool.shape[0]} != b_pool rows {b_pool.shape[0]}")
    if token_index.shape != row_index.shape or token_index.ndim != 1:
        raise ValueError(f"token_index {token_index.shape} and row_index {row_index.shape} must be equal 1-D")
    if implementation != "reference":
        raise ValueError(f"unknown implementation {implementation!r}")
    return lora_rows_reference(x, a_pool, b_pool, token_index, row_index)
