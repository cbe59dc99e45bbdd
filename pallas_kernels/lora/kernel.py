"""Pallas (Triton lowering) gathered LoRA kernels reading A/B rows straight from the unified pool.

Pool: [L, U, Dh]. The A^T row of a rank row starts at unit a_start and runs H_in / Dh units; its B
row starts at b_start and runs H_out / Dh units (scaling folded in). Unit 0 is the zero page, so a
padding row (a_start == 0) contributes nothing and is skipped without a load.

Decode (BGMV, every token its own adapter), two launches as in Punica:
- shrink: grid over (token, rank row) pairs; each program reads one A^T row and its token's x and
  writes one float32 dot product. Work and bytes are the sum of the ranks used: mixed ranks cost
  their own rank, and resident adapters no token uses cost nothing.
- expand: grid over (token, block of output units); each program gathers its token's pairs (a
  contiguous range given by offsets) as one [max_rank, Dh] tile of B rows per output unit, in one
  load when the token's rank is at most max_rank (a loop otherwise), and sums s * B rows.

Decode by adapter (LoraTunables.by_adapter_min_rank, off: measured slower): grouped_kernel.bgmv_by_adapter.

Decode, one launch (bgmv_fused, used up to LoraTunables.fused_max_tokens tokens, 0 by default): each
program recomputes its token's shrunk values and expands them into its own output block.

Prefill (SGMV, one adapter per sequence chunk): the same two launches over blocks of a sequence's
tokens, with the adapter's rows gathered as one [R, Dh] tile per unit and tensor-core dots.

Every unit index is an explicit gather over the pool's unit axis, so rows of any width that is a
multiple of Dh work; the lowering switches to 64-bit offsets itself when the pool passes 4 GB.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lora.grouped_kernel import bgmv_by_adapter, by_adapter_supported
from pallas_kernels.lora.mosaic_kernel import bgmv_expand_mosaic
from pallas_kernels.lora.sgmv_tiles import expand_units, shrink_dot, summed_splits
from pallas_kernels.lora.shapes import (
    LoraTunables,
    expand_num_warps,
    largest_pow2_divisor,
    output_blocks,
    pow2_at_least,
    projection_of,
    shrink_column_block,
    split_cap,
)

# ----------------------------------------------------------------------------------------------
# decode: BGMV


def _shrink_pair(k, layer, tok_ref, a_ref, x_ref, pool_ref, s_ref, *, n_tokens, n_chunks, chunk, row_start):
    """s[k] = x[row_start + token] . the pair's A row (0 for a padding pair, which loads no row)."""
    tok = tok_ref[k]
    a = a_ref[k]
    s_ref[k] = jnp.float32(0.0)

    @pl.when((a > 0) & (tok < n_tokens))
    def _():
        def body(c, acc):
            xs = x_ref[row_start + tok, pl.ds(c * chunk, chunk), :].astype(jnp.float32)  # [chunk, Dh]
            units = a + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            rows = pool_ref[layer, units, :].astype(jnp.float32)  # [chunk, Dh]
            return acc + xs * rows

        dh = pool_ref.shape[2]
        acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((chunk, dh), jnp.float32))
        s_ref[k] = jnp.sum(jnp.sum(acc, axis=1), axis=0)


def bgmv_shrink_program(p, layer, tok_ref, a_ref, x_ref, pool_ref, s_ref, *, pairs, **kw):
    """Program p: pairs p*pairs .. + pairs, unrolled so that their loads are in flight together."""
    for i in range(pairs):
        _shrink_pair(p * pairs + i, layer, tok_ref, a_ref, x_ref, pool_ref, s_ref, **kw)


def _bgmv_shrink_kernel(layer_ref, tok_ref, a_ref, x_ref, pool_ref, s_ref, **kw):
    bgmv_shrink_program(pl.program_id(0), layer_ref[0], tok_ref, a_ref, x_ref, pool_ref, s_ref, **kw)


def _pair_lanes(start, end, c, lane, m, n_pairs):
    """The c-th load of a token's pairs [start, end) of projection m: which lanes hold a pair, and
    each lane's index into the [G*K] pair arrays (clamped for the lanes that do not)."""
    idx = start + c * lane.shape[0] + lane  # [P] this load's pairs
    return idx < end, m * n_pairs + jnp.minimum(idx, n_pairs - 1)


def _expand_into(accs, pool_ref, layer, base, local, s, out_units, valid, masked):
    """accs[u] += sum over the load's pairs of s * their B rows' unit (local block's u-th unit). With
    masked, lanes that hold no pair (valid False: a token of rank below the load's width) load nothing;
    without (interpret mode, which has no masked gathers), they read real rows, multiplied by s = 0."""
    out = []
    for u in range(out_units):  # independent gathers, in flight together
        units = base + local * out_units + u  # [P]
        if masked:
            rows = pltriton.load(pool_ref.at[layer, units, :], mask=valid[:, None], other=0)
        else:
            rows = pool_ref[layer, units, :]
        out.append(accs[u] + jnp.sum(s[:, None] * rows.astype(jnp.float32), axis=0))
    return tuple(out)


def _bgmv_expand_kernel(layer_ref, off_ref, b_ref, s_ref, pool_ref, *refs, **kw):
    """Grid (token, block of output units). refs: (o_ref,), or (y_ref, o_ref) with y aliased to the
    output: the deltas are added to y's rows from row_start on."""
    y_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    ids = (pl.program_id(0), pl.program_id(1))
    bgmv_expand_program(*ids, layer_ref[0], off_ref, b_ref, s_ref, pool_ref, y_ref, o_ref, **kw)


def bgmv_expand_program(
    n,
    j,
    layer,
    off_ref,
    b_ref,
    s_ref,
    pool_ref,
    y_ref,
    o_ref,
    *,
    out_units,
    pairs_per_load,
    n_pairs,
    n_tokens,
    block_starts,
    row_start,
    masked,
):
    """Token n's output block j. With several projections (block_starts: where each one's blocks start,
    statically) the program first finds its projection m: its pairs are the m-th K of b_ref and of the
    shrunk values, its offsets the m-th N + 1, its B rows' units counted from its own first block. With
    y_ref (None or aliased to o_ref) the deltas are added to y's rows from row_start on."""
    m, local = projection_of(j, block_starts)
    start = off_ref[m * (n_tokens + 1) + n]
    end = off_ref[m * (n_tokens + 1) + n + 1]
    lane = jnp.arange(pairs_per_load, dtype=jnp.int32)

    def body(c, accs):
        valid, safe = _pair_lanes(start, end, c, lane, m, n_pairs)
        s = jnp.where(valid, s_ref[safe], 0.0)  # [P] float32
        base = jnp.where(valid, b_ref[safe], 0)
        return _expand_into(accs, pool_ref, layer, base, local, s, out_units, valid, masked)

    dh = pool_ref.shape[2]
    n_loads = (end - start + pairs_per_load - 1) // pairs_per_load  # one load when rank <= pairs_per_load
    accs = jax.lax.fori_loop(0, n_loads, body, tuple(jnp.zeros((dh,), jnp.float32) for _ in range(out_units)))
    for u in range(out_units):
        col = j * out_units + u
        out = accs[u] if y_ref is None else accs[u] + y_ref[row_start + n, col, :].astype(jnp.float32)
        o_ref[row_start + n, col, :] = out.astype(o_ref.dtype)


def bgmv_shrink_launch(units_in: int, k: int, n: int, tunables: LoraTunables, row_start: int):
    """The BGMV shrink's grid and program arguments: K pairs over n tokens from row row_start on."""
    chunk = largest_pow2_divisor(units_in, tunables.chunk_units)
    pairs = largest_pow2_divisor(k, tunables.shrink_pairs)
    kw = dict(n_tokens=n, n_chunks=units_in // chunk, chunk=chunk, pairs=pairs, row_start=row_start)
    return (k // pairs,), kw


@functools.partial(jax.jit, static_argnames=("tunables", "interpret", "row_start", "n_tokens"))
def bgmv_shrink(
    x: jax.Array,  # [N_all, H_in]: the tokens are rows [row_start, row_start + N)
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    token_index: jax.Array,  # [K] int32; padding pairs: N (out of range)
    a_start: jax.Array,  # [K] int32; 0 for padding
    *,
    tunables: LoraTunables,
    interpret: bool = False,
    row_start: int = 0,
    n_tokens: int | None = None,  # N; None: all of x's rows
) -> jax.Array:  # [K] float32: x[row_start + token] . A row of every pair
    n_all, h_in = x.shape
    dh = pool.shape[2]
    k = token_index.shape[0]
    grid, kw = bgmv_shrink_launch(h_in // dh, k, n_all if n_tokens is None else n_tokens, tunables, row_start)
    return pl.pallas_call(
        functools.partial(_bgmv_shrink_kernel, **kw),
        out_shape=jax.ShapeDtypeStruct((k,), jnp.float32),
        grid=grid,
        compiler_params=pltriton.CompilerParams(
            num_warps=tunables.shrink_num_warps or tunables.num_warps, num_stages=tunables.num_stages
        ),
        interpret=interpret,
        name="bgmv_shrink",
    )(
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        token_index,
        a_start,
        x.reshape(n_all, h_in // dh, dh),
        pool,
    )


def bgmv_expand_launch(
    h_outs: tuple[int, ...], dh: int, n_pairs: int, n: int, tunables: LoraTunables, max_rank: int, row_start: int,
    interpret: bool,
):  # fmt: skip
    """The Triton BGMV expand's grid, program arguments and warps: n tokens' deltas of the projections
    h_outs, n_pairs pairs each."""
    _, out_units, blocks, starts = output_blocks(h_outs, dh, tunables.out_units)
    pairs_per_load = pow2_at_least(max_rank)
    if tunables.expand_lanes:
        pairs_per_load = min(pairs_per_load, tunables.expand_lanes)
    kw = dict(
        out_units=out_units,
        pairs_per_load=pairs_per_load,
        n_pairs=n_pairs,
        n_tokens=n,
        block_starts=starts,
        row_start=row_start,
        masked=not interpret,
    )
    return (n, sum(blocks)), kw, expand_num_warps(tunables, pairs_per_load)


@functools.partial(
    jax.jit, static_argnames=("h_outs", "dtype", "tunables", "max_rank", "interpret", "row_start")
)
def bgmv_expand(
    shrunk: jax.Array,  # [G*K] float32; projection m's pairs are [m*K, (m+1)*K)
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    b_start: jax.Array,  # [G*K] int32: the G projections' B rows, K pairs each
    offsets: jax.Array,  # [G*(N+1)] int32: projection m's token n has pairs offsets[m*(N+1) + n] .. + 1
    *,
    h_outs: tuple[int, ...],  # each projection's output width
    dtype: jnp.dtype,
    tunables: LoraTunables,
    max_rank: int = 16,
    interpret: bool = False,
    y: jax.Array | None = None,  # [N_all, sum(h_outs)]: add the deltas to its rows row_start .. + N
    row_start: int = 0,
) -> jax.Array:  # [N, sum(h_outs)] in dtype: the projections' deltas side by side; or y with them added
    g = len(h_outs)
    n = offsets.shape[0] // g - 1
    dh = pool.shape[2]
    units_out = sum(h_outs) // dh
    grid, kw, warps = bgmv_expand_launch(
        h_outs, dh, b_start.shape[0] // g, n, tunables, max_rank, row_start, interpret
    )
    args = [jnp.reshape(layer, (1,)).astype(jnp.int32), offsets, b_start, shrunk, pool]
    out_rows, aliases = n, {}
    if y is not None:
        out_rows, dtype, aliases = y.shape[0], y.dtype, {len(args): 0}
        args.append(y.reshape(out_rows, units_out, dh))
    elif row_start:
        raise ValueError("row_start needs y")
    out = pl.pallas_call(
        functools.partial(_bgmv_expand_kernel, **kw),
        out_shape=jax.ShapeDtypeStruct((out_rows, units_out, dh), dtype),
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=tunables.num_stages),
        interpret=interpret,
        name="bgmv_expand_add" if y is not None else "bgmv_expand",
    )(*args)
    return out.reshape(out_rows, sum(h_outs))


def _bgmv_fused_kernel(
    layer_ref,
    off_ref,
    a_ref,
    b_ref,
    x_ref,
    pool_ref,
    o_ref,
    *,
    out_units,
    pairs_per_load,
    n_pairs,
    n_tokens,
    block_starts,
    n_chunks,
    chunk,
    masked,
):
    """Shrink and expand in one program per (token, block of output units): the program computes its
    token's shrunk values itself (reading the token's A rows; the other blocks of the same token read
    them again, from L2) and expands them into its block. One launch instead of two, and no shrunk
    values through memory, meant for small batches, where a launch costs more than the bytes. On the
    H100 it was slower than the two launches even at 8 tokens (21 vs 15.7 us, bench/RESULTS.md: each
    program's chain of loads is longer), so the tuned tables leave it off (fused_max_tokens 0)."""
    n = pl.program_id(0)
    j = pl.program_id(1)
    layer = layer_ref[0]
    m, local = projection_of(j, block_starts)
    start = off_ref[m * (n_tokens + 1) + n]
    end = off_ref[m * (n_tokens + 1) + n + 1]
    lane = jnp.arange(pairs_per_load, dtype=jnp.int32)
    dh = pool_ref.shape[2]

    def body(c, accs):
        valid, safe = _pair_lanes(start, end, c, lane, m, n_pairs)
        a = jnp.where(valid, a_ref[safe], 0)
        base = jnp.where(valid, b_ref[safe], 0)

        def shrink(i, acc):
            for u in range(chunk):  # independent loads, in flight together
                unit = i * chunk + u
                xs = x_ref[n, unit, :].astype(jnp.float32)  # [Dh]
                acc = acc + pool_ref[layer, a + unit, :].astype(jnp.float32) * xs[None, :]
            return acc

        acc = jax.lax.fori_loop(0, n_chunks, shrink, jnp.zeros((pairs_per_load, dh), jnp.float32))
        s = jnp.where(valid, jnp.sum(acc, axis=1), 0.0)  # [P]: padding lanes read real rows, add nothing
        return _expand_into(accs, pool_ref, layer, base, local, s, out_units, valid, masked)

    n_loads = (end - start + pairs_per_load - 1) // pairs_per_load
    accs = jax.lax.fori_loop(0, n_loads, body, tuple(jnp.zeros((dh,), jnp.float32) for _ in range(out_units)))
    for u in range(out_units):
        o_ref[n, j * out_units + u, :] = accs[u].astype(o_ref.dtype)  # projections side by side


@functools.partial(jax.jit, static_argnames=("h_outs", "tunables", "max_rank", "interpret"))
def bgmv_fused(
    x: jax.Array,  # [N, H_in]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [G*K] int32: the G projections' A rows, K pairs each; 0 for padding
    b_start: jax.Array,  # [G*K] int32: their B rows
    offsets: jax.Array,  # [G*(N+1)] int32: projection m's token n has pairs offsets[m*(N+1) + n] .. + 1
    *,
    h_outs: tuple[int, ...],
    tunables: LoraTunables,
    max_rank: int = 16,
    interpret: bool = False,
) -> jax.Array:  # [N, sum(h_outs)] in x.dtype: the projections' deltas side by side
    """BGMV shrink and expand of G projections that read the same x, in one launch."""
    g = len(h_outs)
    n, h_in = x.shape
    dh = pool.shape[2]
    units_in = h_in // dh
    chunk = largest_pow2_divisor(units_in, tunables.fused_chunk_units)
    units, out_units, blocks, starts = output_blocks(h_outs, dh, tunables.fused_out_units)
    out = pl.pallas_call(
        functools.partial(
            _bgmv_fused_kernel,
            out_units=out_units,
            pairs_per_load=pow2_at_least(max_rank),
            n_pairs=a_start.shape[0] // g,
            n_tokens=n,
            block_starts=starts,
            n_chunks=units_in // chunk,
            chunk=chunk,
            masked=not interpret,
        ),
        out_shape=jax.ShapeDtypeStruct((n, sum(units), dh), x.dtype),
        grid=(n, sum(blocks)),
        compiler_params=pltriton.CompilerParams(
            num_warps=tunables.fused_num_warps, num_stages=tunables.num_stages
        ),
        interpret=interpret,
        name="bgmv_fused",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), offsets, a_start, b_start, x.reshape(n, units_in, dh), pool)
    return out.reshape(n, sum(h_outs))


def lora_decode_kernel(
    x: jax.Array,  # [N_all, H_in]: the tokens are rows [row_start, row_start + N)
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    token_index: jax.Array,  # [G*K] int32, each projection's K grouped by token; padding pairs: N
    a_start: jax.Array,  # [G*K] int32; 0 for padding
    b_start: jax.Array,  # [G*K] int32
    offsets: jax.Array,  # [G*(N+1)] int32: projection m's token n has pairs offsets[m*(N+1) + n] .. + 1
    *,
    h_outs: tuple[int, ...],
    tunables: LoraTunables,
    max_rank: int = 16,
    interpret: bool = False,
    y: jax.Array | None = None,  # [N_all, sum(h_outs)]: add the deltas to its rows row_start .. + N
    row_start: int = 0,
) -> jax.Array:  # [N, sum(h_outs)] in x.dtype; or y with the deltas added
    """BGMV of G >= 1 projections that read the same x: by adapter (grouped_kernel) with
    rank buckets of at least tunables.by_adapter_min_rank; else one launch (bgmv_fused) for batches of at most
    tunables.fused_max_tokens tokens, else a shared shrink and a shared expand. With y, the Triton
    expand adds the deltas into y's rows in place; the other expands add them afterwards."""
    kw = dict(tunables=tunables, max_rank=max_rank, interpret=interpret)
    n = offsets.shape[0] // len(h_outs) - 1
    if 0 < tunables.by_adapter_min_rank <= max_rank and by_adapter_supported(max_rank):
        if y is None:
            y, row_start = jnp.zeros((n, sum(h_outs)), x.dtype), 0
        return bgmv_by_adapter(
            x, pool, layer, a_start, b_start, offsets, y, h_outs=h_outs, rank=max_rank, tunables=tunables,
            interpret=interpret, row_start=row_start,
        )  # fmt: skip
    if y is not None and (n <= tunables.fused_max_tokens or tunables.expand_backend != "triton"):
        rows = x[row_start : row_start + n]
        delta = lora_decode_kernel(
            rows, pool, layer, token_index, a_start, b_start, offsets, h_outs=h_outs, **kw
        )
        return y.at[row_start : row_start + n].add(delta.astype(y.dtype))
    if n <= tunables.fused_max_tokens:
        return bgmv_fused(x, pool, layer, a_start, b_start, offsets, h_outs=h_outs, **kw)
    shrunk = bgmv_shrink(
        x,
        pool,
        layer,
        token_index,
        a_start,
        tunables=tunables,
        interpret=interpret,
        row_start=row_start,
        n_tokens=n,
    )
    expand = expand_kernel(tunables)
    if y is not None:
        return bgmv_expand(
            shrunk,
            pool,
            layer,
            b_start,
            offsets,
            h_outs=h_outs,
            dtype=y.dtype,
            y=y,
            row_start=row_start,
            **kw,
        )
    return expand(shrunk, pool, layer, b_start, offsets, h_outs=h_outs, dtype=x.dtype, **kw)


def expand_kernel(tunables: LoraTunables):
    """The BGMV expand that tunables.expand_backend names (both take the same arguments)."""
    if tunables.expand_backend == "mosaic":
        return bgmv_expand_mosaic
    if tunables.expand_backend != "triton":
        raise ValueError(f"expand_backend must be 'triton' or 'mosaic', not {tunables.expand_backend!r}")
    return bgmv_expand


# ----------------------------------------------------------------------------------------------
# prefill: SGMV

SGMV_SHRINK_PROGRAMS = 128  # split the shrink's input units until about this many programs run
# ... but at most shapes.split_cap's (sgmv_split_columns over a member's rank, sgmv_max_splits)


def _sgmv_shrink_kernel(layer_ref, a_ref, x_ref, pool_ref, s_ref, **kw):
    ids = tuple(pl.program_id(i) for i in range(4))
    sgmv_shrink_program(*ids, layer_ref[0], a_ref, x_ref, pool_ref, s_ref, **kw)


def sgmv_shrink_program(
    b, tb, k, cb, layer, a_ref, x_ref, pool_ref, s_ref, *, block_tokens, units_per, columns, f32_dot, seq_len,
    row_start,
):  # fmt: skip
    """Token block tb of sequence b against its adapter's A rows (column block cb of them), over split
    k of the input units (split-K: a lone long chunk would otherwise run only T / block_tokens
    programs). x: [rows, units, Dh], sequence b's tokens at rows row_start + b * seq_len .. + seq_len."""
    t0 = tb * block_tokens
    c0 = cb * columns
    rows_a = a_ref[b, pl.ds(c0, columns)]  # [R]: this program's columns
    r = rows_a.shape[0]
    row0 = row_start + b * seq_len + t0

    def body(i, acc):
        c = k * units_per + i
        xs = x_ref[pl.ds(row0, block_tokens), c, :]  # [BT, Dh]
        tile = pool_ref[layer, rows_a + c, :]  # [R, Dh]; padding rows read the zero page
        return acc + shrink_dot(xs, tile, f32_dot)

    acc = jax.lax.fori_loop(0, units_per, body, jnp.zeros((block_tokens, r), jnp.float32))
    s_ref[b, pl.ds(t0, block_tokens), k, pl.ds(c0, columns)] = acc


def _sgmv_expand_kernel(layer_ref, b_ref, s_ref, pool_ref, *refs, **kw):
    """refs: (o_ref,), or (y_ref, o_ref) with y aliased to the output."""
    y_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    ids = tuple(pl.program_id(i) for i in range(3))
    sgmv_expand_program(*ids, layer_ref[0], b_ref, s_ref, pool_ref, y_ref, o_ref, **kw)


def sgmv_expand_program(
    b,
    tb,
    j,
    layer,
    b_ref,
    s_ref,
    pool_ref,
    y_ref,
    o_ref,
    *,
    block_tokens,
    out_units,
    splits,
    rank,
    block_starts,
    f32_dot,
    seq_len,
    row_start,
):
    """Token block tb of sequence b times out_units output units (block j) of one projection of the
    group (member m owns the shrunk columns and B rows [m * rank, (m + 1) * rank)). With y_ref (None or
    aliased to o_ref) the deltas are added to y's rows (sequence b's at row_start + b * seq_len)."""
    t0 = tb * block_tokens
    row0 = row_start + b * seq_len + t0
    m, jm = projection_of(j, block_starts)  # the member, and the block within its own output
    rows_b = b_ref[b, pl.ds(m * rank, rank)]  # [R]
    sums = summed_splits(s_ref, b, pl.ds(t0, block_tokens), splits, pl.ds(m * rank, rank))  # [BT, R]
    rows = pl.ds(row0, block_tokens)
    expand_units(pool_ref, y_ref, o_ref, layer, rows_b, sums, rows, j, jm, out_units, f32_dot)


@dataclasses.dataclass(frozen=True)
class SgmvLaunches:
    """The SGMV shrink's and expand's grids and program arguments, and the shrunk partials' shape."""

    shrink_grid: tuple[int, ...]
    shrink_kw: dict
    shrunk_shape: tuple[int, ...]
    expand_grid: tuple[int, ...]
    expand_kw: dict


def sgmv_launches(
    units_in: int, starts_shape: tuple[int, int], h_outs: tuple[int, ...], dh: int, rank: int, tunables: LoraTunables,
    seq_len: int, row_start: int, f32_dot: bool,
) -> SgmvLaunches:  # fmt: skip
    """Launch shapes of sgmv_rows: B sequences of seq_len tokens (starts_shape [B, RG])."""
    bsz, rg = starts_shape
    t = seq_len
    _, out_units, blocks, block_starts = output_blocks(h_outs, dh, tunables.sgmv_out_units)
    bt = min(tunables.block_tokens, t)
    # split-K: enough shrink programs to fill the GPU when there are few token blocks (one 256-token
    # chunk: 8 blocks of 32, each over all of H_in, took 22 us per projection on the H100)
    columns = shrink_column_block(rg, tunables)
    programs = bsz * (t // bt) * (rg // columns)
    cap = min(SGMV_SHRINK_PROGRAMS // programs, split_cap(tunables, rank))
    splits = largest_pow2_divisor(units_in, max(1, cap))
    rows = dict(block_tokens=bt, f32_dot=f32_dot, seq_len=t, row_start=row_start)
    return SgmvLaunches(
        shrink_grid=(bsz, t // bt, splits, rg // columns),
        shrink_kw=dict(units_per=units_in // splits, columns=columns, **rows),
        shrunk_shape=(bsz, t, splits, rg),
        expand_grid=(bsz, t // bt, sum(blocks)),
        expand_kw=dict(out_units=out_units, splits=splits, rank=rank, block_starts=block_starts, **rows),
    )


@functools.partial(
    jax.jit, static_argnames=("h_outs", "rank", "tunables", "interpret", "seq_len", "row_start")
)
def sgmv_rows(
    x: jax.Array,  # [N_all, H_in]: sequence b's tokens are rows row_start + b * seq_len .. + seq_len
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [B, RG] int32; 0 for padding rows
    b_start: jax.Array,  # [B, RG] int32
    y: jax.Array | None,  # [N_all, sum(h_outs)] to add the deltas into (aliased), or None
    *,
    h_outs: tuple[int, ...],
    rank: int,
    tunables: LoraTunables,
    seq_len: int,
    row_start: int = 0,
    interpret: bool = False,
) -> jax.Array:  # y with the deltas added to the sequences' rows; or the deltas [B * seq_len, sum(h_outs)]
    """SGMV of G projections that read the same x (one shrink launch and one expand launch for all):
    member m's rows are columns [m * rank, (m + 1) * rank) of a_start/b_start (RG >= G * rank, a power
    of two; the rest padding)."""
    n_all, h_in = x.shape
    dh = pool.shape[2]
    units_out = sum(h_outs) // dh
    f32_dot = x.dtype == jnp.float32 or pool.dtype == jnp.float32
    plan = sgmv_launches(h_in // dh, a_start.shape, h_outs, dh, rank, tunables, seq_len, row_start, f32_dot)
    layer_arr = jnp.reshape(layer, (1,)).astype(jnp.int32)
    shrunk = pl.pallas_call(
        functools.partial(_sgmv_shrink_kernel, **plan.shrink_kw),
        out_shape=jax.ShapeDtypeStruct(plan.shrunk_shape, jnp.float32),
        grid=plan.shrink_grid,
        compiler_params=pltriton.CompilerParams(
            num_warps=tunables.sgmv_num_warps, num_stages=tunables.num_stages
        ),
        interpret=interpret,
        name="sgmv_shrink",
    )(layer_arr, a_start, x.reshape(n_all, h_in // dh, dh), pool)
    args = [layer_arr, b_start, shrunk, pool]
    out_rows, dtype, aliases = a_start.shape[0] * seq_len, x.dtype, {}
    if y is not None:
        out_rows, dtype, aliases = y.shape[0], y.dtype, {len(args): 0}
        args.append(y.reshape(out_rows, units_out, dh))
    elif row_start:
        raise ValueError("row_start needs y")
    out = pl.pallas_call(
        functools.partial(_sgmv_expand_kernel, **plan.expand_kw),
        out_shape=jax.ShapeDtypeStruct((out_rows, units_out, dh), dtype),
        grid=plan.expand_grid,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(
            num_warps=tunables.sgmv_num_warps, num_stages=tunables.num_stages
        ),
        interpret=interpret,
        name="sgmv_expand_add" if y is not None else "sgmv_expand",
    )(*args)
    return out.reshape(out_rows, units_out * dh)


def lora_prefill_kernel(
    x: jax.Array,  # [B, T, H_in]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [B, RG] int32; 0 for padding rows
    b_start: jax.Array,  # [B, RG] int32
    *,
    h_outs: tuple[int, ...],
    rank: int,
    tunables: LoraTunables,
    interpret: bool = False,
) -> jax.Array:  # [B, T, sum(h_outs)]: the members' deltas side by side
    """sgmv_rows over a [B, T] batch of its own."""
    bsz, t, h_in = x.shape
    out = sgmv_rows(
        x.reshape(bsz * t, h_in),
        pool,
        layer,
        a_start,
        b_start,
        None,
        h_outs=h_outs,
        rank=rank,
        tunables=tunables,
        seq_len=t,
        interpret=interpret,
    )
    return out.reshape(bsz, t, -1)


def sgmv_supported(t: int, r: int, tunables: LoraTunables) -> bool:
    """Triton dots need at least 16 rows and columns and power-of-two tiles (r: each member's rank
    bucket)."""
    bt = min(tunables.block_tokens, t)
    return bt >= 16 and t % bt == 0 and r >= 16 and (r & (r - 1)) == 0 and (bt & (bt - 1)) == 0
