"""The tile arithmetic that the SGMV kernels (kernel.py: a sequence's contiguous rows) and the decode
kernels by adapter (grouped_kernel.py: a group's rows by index) share: the shrink's partial dot, the
expand's split partials summed, and its output units added into y's rows. `rows` indexes x/y/o's row
axis: a pl.ds of contiguous rows, or an int32 array of row indices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


def shrink_dot(xs: jax.Array, tile: jax.Array, f32_dot: bool) -> jax.Array:
    """xs [BT, Dh] . tile [C, Dh]^T as float32 [BT, C]: in float32 without TF32 when either side is
    float32, else in x's dtype with a float32 accumulator."""
    if f32_dot:
        return pltriton.dot(xs.astype(jnp.float32), tile.astype(jnp.float32), trans_b=True, allow_tf32=False)
    return pltriton.dot(xs, tile.astype(xs.dtype), trans_b=True)


def summed_splits(s_ref, seq, tokens, splits: int, columns) -> jax.Array:
    """The shrink's split-K partials of one sequence's tokens and columns, added: [BT, R] float32.
    s_ref: [sequences, T, splits, RG]."""
    sums = s_ref[seq, tokens, 0, columns]
    for split in range(1, splits):
        sums = sums + s_ref[seq, tokens, split, columns]
    return sums


def expand_units(
    pool_ref, y_ref, o_ref, layer, rows_b, sums, rows, j, jm, out_units: int, f32_dot: bool
) -> None:
    """Output units j * out_units .. + out_units of the rows: sums [BT, R] times each unit's B rows
    (rows_b [R]: the member's; jm: the block within its own output), added to y's rows when y_ref is
    given, written to o_ref's."""
    for u in range(out_units):
        tile = pool_ref[layer, rows_b + (jm * out_units + u), :]  # [R, Dh]
        if f32_dot:
            out = pltriton.dot(sums, tile.astype(jnp.float32), allow_tf32=False)
        else:
            out = pltriton.dot(sums.astype(tile.dtype), tile)
        col = j * out_units + u
        if y_ref is not None:
            out = out.astype(jnp.float32) + y_ref[rows, col, :].astype(jnp.float32)
        o_ref[rows, col, :] = out.astype(o_ref.dtype)
