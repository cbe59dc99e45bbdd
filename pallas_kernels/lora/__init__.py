"""Gathered LoRA shrink+expand. Public functions validate shapes early, then pick kernel or reference.

- lora_rows: rows in per-module pools (the reference generate path).
- lora_decode: BGMV, one adapter per token, rows read straight from the unified paged pool.
- lora_prefill: SGMV, one adapter per sequence chunk, rows read straight from the unified pool.
"""

from __future__ import annotations

import jax

from pallas_kernels.lora.reference import lora_decode_reference, lora_prefill_reference, lora_rows_reference

__all__ = [
    "lora_decode",
    "lora_decode_reference",
    "lora_prefill",
    "lora_prefill_reference",
    "lora_rows",
    "lora_rows_reference",
]


def _check_impl(implementation: str) -> None:
    if implementation != "reference":
        raise ValueError(f"unknown implementation {implementation!r}")


def lora_rows(x, a_pool, b_pool, token_index, row_index, *, implementation: str = "reference") -> jax.Array:
    """The LoRA delta of every token (see reference.py for the layout). Shapes are checked here."""
    if x.ndim != 2 or a_pool.ndim != 2 or b_pool.ndim != 2:
        raise ValueError(f"x, a_pool, b_pool must be 2-D; got {x.shape}, {a_pool.shape}, {b_pool.shape}")
    if a_pool.shape[1] != x.shape[1]:
        raise ValueError(f"a_pool width {a_pool.shape[1]} != x width {x.shape[1]}")
    if a_pool.shape[0] != b_pool.shape[0]:
        raise ValueError(f"a_pool rows {a_pool.shape[0]} != b_pool rows {b_pool.shape[0]}")
    if token_index.shape != row_index.shape or token_index.ndim != 1:
        raise ValueError(f"token_index {token_index.shape} and row_index {row_index.shape} must be equal 1-D")
    _check_impl(implementation)
    return lora_rows_reference(x, a_pool, b_pool, token_index, row_index)


def lora_decode(x, pool, layer, token_index, a_start, b_start, h_out: int, *, implementation: str = "reference"):
    if x.ndim != 2 or pool.ndim != 3:
        raise ValueError(f"x must be [N, H_in] and pool [L, U, Dh]; got {x.shape}, {pool.shape}")
    if not (token_index.shape == a_start.shape == b_start.shape) or token_index.ndim != 1:
        raise ValueError("token_index, a_start, b_start must be equal 1-D arrays")
    _check_impl(implementation)
    return lora_decode_reference(x, pool, layer, token_index, a_start, b_start, h_out)


def lora_prefill(x, pool, layer, a_start, b_start, h_out: int, *, implementation: str = "reference"):
    if x.ndim != 3 or pool.ndim != 3:
        raise ValueError(f"x must be [B, T, H_in] and pool [L, U, Dh]; got {x.shape}, {pool.shape}")
    if a_start.shape != b_start.shape or a_start.ndim != 2 or a_start.shape[0] != x.shape[0]:
        raise ValueError(f"a_start {a_start.shape} / b_start {b_start.shape} must be [B, R] with B = {x.shape[0]}")
    _check_impl(implementation)
    return lora_prefill_reference(x, pool, layer, a_start, b_start, h_out)
