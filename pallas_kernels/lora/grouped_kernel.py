"""Decode LoRA by adapter (LoraTunables.by_adapter_min_rank; off: slower than BGMV on the H200 at n = 5,
bench/RESULTS.md's nineteenth session): a step's tokens grouped by their adapter on the device, each
group run as an SGMV sequence of block_tokens rows.

BGMV (kernel.py) reads an adapter's A and B rows once per token; where a step's tokens share few
adapters (slora-trace at n = 5: 17 tokens on ~4.6 adapters) that is ~4x the distinct rows. Here each
group reads its adapter's rows once a program and multiplies all of its tokens at once on tensor cores:

- adapter_groups (jnp, once a step: its inputs are the same for every layer) sorts the tokens by their
  adapter and cuts the groups into sequences of block_tokens rows: rows [S, BT] (x's row of each lane;
  a sequence's spare lanes repeat its first row, -1 for a sequence not used) and the leader's rank rows
  of every member, a_rows / b_rows [S, RG], as the SGMV kernels take them.
- shrink: grid (sequence, split of the input units, block of columns); x's rows gathered by index.
- expand: grid (sequence, block of output units); the sums added into y's rows and written back by
  index. A spare lane computes exactly its sequence's first row (same x row, same adapter), so its
  write repeats that row's value: no masked stores are needed.

Every token's rank must be at most the rank bucket given (the engine's bucket is at least every
adapter's rank); a token without pairs is in no sequence and its row of y is left as it is."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lora.sgmv_tiles import expand_units, shrink_dot, summed_splits
from pallas_kernels.lora.shapes import (
    LoraTunables,
    largest_pow2_divisor,
    output_blocks,
    pow2_at_least,
    projection_of,
    shrink_column_block,
    split_cap,
)

BLOCK_TOKENS = 16  # a sequence's rows: the smallest tensor-core tile


def group_width(g: int, rank: int) -> int:
    """Columns of a sequence's rank rows: G members of rank columns each, padded to a power of two."""
    return pow2_at_least(g * rank)


def adapter_groups(
    a_start: jax.Array,  # [G*K] int32: projection m's pairs the m-th K, grouped by token, rank order
    b_start: jax.Array,  # [G*K] int32
    offsets: jax.Array,  # [G*(N+1)] int32: projection m's token n has pairs offsets[m*(N+1) + n] .. + 1
    *,
    g: int,
    rank: int,
    block_tokens: int = BLOCK_TOKENS,
    row_start: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rows [S, BT], a_rows [S, RG], b_rows [S, RG]) with S = N sequences at most and RG =
    group_width(g, rank). A token's adapter is known by the first A row of its pairs in any member
    (two adapters never share pool rows); tokens of one adapter form one group, cut every block_tokens
    tokens. Member m's rank rows of a sequence are columns [m * rank, (m + 1) * rank), 0 (the zero page)
    past its adapter's rank for that member."""
    n = offsets.shape[0] // g - 1
    k = a_start.shape[0] // g
    off = offsets.reshape(g, n + 1)
    first, count = off[:, :-1], off[:, 1:] - off[:, :-1]  # [G, N]
    a2, b2 = a_start.reshape(g, k), b_start.reshape(g, k)
    key = jnp.max(
        jnp.where(count > 0, jnp.take_along_axis(a2, jnp.minimum(first, k - 1), axis=1), -1), axis=0
    )
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # the tokens without pairs (-1) first
    sk = key[order]
    pos = jnp.arange(n, dtype=jnp.int32)
    new_group = jnp.concatenate([jnp.ones((1,), bool), sk[1:] != sk[:-1]])
    in_group = pos - jax.lax.cummax(jnp.where(new_group, pos, 0))  # the token's place in its group
    starts = (in_group % block_tokens == 0) & (sk >= 0)
    seq = jnp.where(sk >= 0, jnp.cumsum(starts.astype(jnp.int32)) - 1, n)  # n: in no sequence
    lane = in_group % block_tokens
    row = order + row_start
    # no slice of either scatter: XLA's GPU scatter-slice simplifier failed a RET_CHECK on
    # rows = scatter[:n] with rows[:, :1] (jax 0.11.2, H200); sequence n (in none) is dropped
    rows = jnp.full((n, block_tokens), -1, jnp.int32).at[seq, lane].set(row, mode="drop")
    head = jnp.full((n,), -1, jnp.int32).at[jnp.where(starts, seq, n)].set(row, mode="drop")  # [S]
    rows = jnp.where(rows >= 0, rows, head[:, None])  # spare lanes repeat the sequence's first row
    leader = jnp.where(head >= 0, head - row_start, 0)  # [S]
    j = jnp.arange(rank, dtype=jnp.int32)
    used = (head >= 0)[None, :, None] & (j[None, None, :] < count[:, leader][:, :, None])  # [G, S, R]
    pair = jnp.minimum(first[:, leader][:, :, None] + j, k - 1)  # [G, S, R]
    width = group_width(g, rank)

    def table(starts2: jax.Array) -> jax.Array:
        t = jnp.where(used, jnp.take_along_axis(starts2, pair.reshape(g, -1), axis=1).reshape(pair.shape), 0)
        t = jnp.transpose(t, (1, 0, 2)).reshape(n, g * rank)
        return jnp.pad(t, ((0, 0), (0, width - g * rank)))

    return rows, table(a2), table(b2)


def _shrink_kernel(layer_ref, rows_ref, a_ref, x_ref, pool_ref, s_ref, *, units_per, columns, f32_dot):
    """Sequence s's rows (gathered from x) against one block of columns of its rank rows, over one
    split of the input units; a sequence not used (first row -1) does nothing."""
    s = pl.program_id(0)
    k = pl.program_id(1)
    c0 = pl.program_id(2) * columns

    @pl.when(rows_ref[s, 0] >= 0)
    def _():
        layer = layer_ref[0]
        rows = rows_ref[s, :]  # [BT]
        rows_a = a_ref[s, pl.ds(c0, columns)]  # [C]

        def body(i, acc):
            c = k * units_per + i
            xs = x_ref[rows, c, :]  # [BT, Dh]
            tile = pool_ref[layer, rows_a + c, :]  # [C, Dh]; padding rows read the zero page
            return acc + shrink_dot(xs, tile, f32_dot)

        acc = jax.lax.fori_loop(0, units_per, body, jnp.zeros((rows.shape[0], columns), jnp.float32))
        s_ref[s, :, k, pl.ds(c0, columns)] = acc


def _expand_kernel(
    layer_ref,
    rows_ref,
    b_ref,
    s_ref,
    pool_ref,
    y_ref,
    o_ref,
    *,
    out_units,
    splits,
    rank,
    block_starts,
    f32_dot,
):
    """Sequence s's sums (its splits added) times out_units output units of one member's B rows,
    added to y's rows of the sequence and written back to them (o aliases y)."""
    s = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(rows_ref[s, 0] >= 0)
    def _():
        layer = layer_ref[0]
        rows = rows_ref[s, :]  # [BT]
        m, jm = projection_of(j, block_starts)
        rows_b = b_ref[s, pl.ds(m * rank, rank)]  # [R]
        sums = summed_splits(s_ref, s, slice(None), splits, pl.ds(m * rank, rank))  # [BT, R] float32
        expand_units(pool_ref, y_ref, o_ref, layer, rows_b, sums, rows, j, jm, out_units, f32_dot)


@functools.partial(jax.jit, static_argnames=("h_outs", "rank", "tunables", "interpret", "row_start"))
def bgmv_by_adapter(
    x: jax.Array,  # [N_all, H_in]: the tokens are rows [row_start, row_start + N)
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [G*K] int32
    b_start: jax.Array,  # [G*K] int32
    offsets: jax.Array,  # [G*(N+1)] int32
    y: jax.Array,  # [N_all, sum(h_outs)]: the deltas are added to its rows row_start .. + N (aliased)
    *,
    h_outs: tuple[int, ...],
    rank: int,  # the rank bucket: at least every token's rank; a power of two >= 16
    tunables: LoraTunables,
    interpret: bool = False,
    row_start: int = 0,
) -> jax.Array:  # y with the deltas added
    """The G projections' BGMV deltas, by adapter, added into y. Launch shapes from the SGMV tunables:
    split_cap (sgmv_split_columns over rank, sgmv_max_splits), sgmv_shrink_columns (columns a
    shrink program), sgmv_out_units and sgmv_num_warps."""
    g = len(h_outs)
    n_all, h_in = x.shape
    dh = pool.shape[2]
    units_in = h_in // dh
    rows, a_rows, b_rows = adapter_groups(a_start, b_start, offsets, g=g, rank=rank, row_start=row_start)
    n_seq, bt = rows.shape
    width = a_rows.shape[1]
    columns = shrink_column_block(width, tunables)
    splits = largest_pow2_divisor(units_in, max(1, split_cap(tunables, rank)))
    f32_dot = x.dtype == jnp.float32 or pool.dtype == jnp.float32
    layer_arr = jnp.reshape(layer, (1,)).astype(jnp.int32)
    params = pltriton.CompilerParams(num_warps=tunables.sgmv_num_warps, num_stages=tunables.num_stages)
    shrunk = pl.pallas_call(
        functools.partial(_shrink_kernel, units_per=units_in // splits, columns=columns, f32_dot=f32_dot),
        out_shape=jax.ShapeDtypeStruct((n_seq, bt, splits, width), jnp.float32),
        grid=(n_seq, splits, width // columns),
        compiler_params=params,
        interpret=interpret,
        name="bgmv_by_adapter_shrink",
    )(layer_arr, rows, a_rows, x.reshape(n_all, units_in, dh), pool)
    units, out_units, blocks, block_starts = output_blocks(h_outs, dh, tunables.sgmv_out_units)
    out = pl.pallas_call(
        functools.partial(
            _expand_kernel,
            out_units=out_units,
            splits=splits,
            rank=rank,
            block_starts=block_starts,
            f32_dot=f32_dot,
        ),
        out_shape=jax.ShapeDtypeStruct((y.shape[0], sum(units), dh), y.dtype),
        grid=(n_seq, sum(blocks)),
        input_output_aliases={5: 0},
        compiler_params=params,
        interpret=interpret,
        name="bgmv_by_adapter_expand_add",
    )(layer_arr, rows, b_rows, shrunk, pool, y.reshape(y.shape[0], sum(units), dh))
    return out.reshape(y.shape[0], sum(h_outs))


def by_adapter_supported(rank: int) -> bool:
    """Triton dots need a power-of-two rank bucket of at least 16."""
    return rank >= 16 and rank & (rank - 1) == 0
