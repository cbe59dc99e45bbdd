"""Pallas (Triton lowering) K/V write: a step's new K/V rows of every layer into their pool units.

XLA's scatter for this write ran at about 0.1-0.3 TB/s on the H100 (0.09 ms a decode step of 16
tokens, 0.48 ms a chunk step of 272: `bench/RESULTS.md`), where the bytes are those of a copy; this
kernel takes 0.052 ms where the scatter took 0.363 ms in the same chunk steps on the H200
(`mixed-step-{new,old}256-20261203T*.json`; BLOCK_ROWS not tuned). Here
the rows are a flat [L, R, Dh] array (R = tokens * 2 Hkv: each token's K heads, then its V heads) with
the pool unit of each row in `units` [R]; one program per (layer, block of rows) loads its rows and
stores them at their units. The pool is aliased to the output, so the write is in place. Rows whose
unit is >= U (padding tokens) are written as zeros into unit 0, in page 0: the pool's zero page, never
handed out (jlora.pool.memory), so it stays zero - the contract this kernel needs of its caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_ROWS = 64  # rows (of Dh elements) per program


def _write_kernel(units_ref, rows_ref, pool_in_ref, pool_ref, *, block_rows, n_rows, n_units):
    del pool_in_ref  # the same buffer as pool_ref (aliased): only written
    layer, i = pl.program_id(0), pl.program_id(1)
    r0 = i * block_rows
    r = r0 + jnp.arange(block_rows, dtype=jnp.int32)
    in_rows = r < n_rows
    units = pltriton.load(units_ref.at[pl.ds(r0, block_rows)], mask=in_rows, other=n_units)
    ok = units < n_units
    # a row not written (padding) goes as zeros to unit 0, in the zero page, which stays zero (a
    # masked scatter-store has no Pallas form)
    rows = pltriton.load(rows_ref.at[layer, pl.ds(r0, block_rows), :], mask=ok[:, None], other=0)
    pool_ref[layer, jnp.where(ok, units, 0), :] = rows


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_kernel(
    pool: jax.Array,  # [L, U, Dh]
    k: jax.Array,  # [L, B, T, Hkv, Dh] this step's keys, every layer
    v: jax.Array,  # [L, B, T, Hkv, Dh]
    write_units: jax.Array,  # [B, T] int32 first unit of each token's K; >= U for padding (dropped)
    *,
    interpret: bool = False,
) -> jax.Array:  # the pool with the rows written
    n_layers, n_units, dh = pool.shape
    hkv = k.shape[3]
    rows = jnp.concatenate([k, v], axis=-2).astype(pool.dtype).reshape(n_layers, -1, dh)  # [L, R, Dh]
    units = (write_units[..., None] + jnp.arange(2 * hkv, dtype=jnp.int32)).reshape(-1)  # [R]
    n_rows = units.shape[0]
    block_rows = min(BLOCK_ROWS, max(16, 1 << (n_rows - 1).bit_length()))
    return pl.pallas_call(
        functools.partial(_write_kernel, block_rows=block_rows, n_rows=n_rows, n_units=n_units),
        out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
        grid=(n_layers, pl.cdiv(n_rows, block_rows)),
        input_output_aliases={2: 0},
        compiler_params=pltriton.CompilerParams(num_warps=2, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(units.astype(jnp.int32), rows, pool)
