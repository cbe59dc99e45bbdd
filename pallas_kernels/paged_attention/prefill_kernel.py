"""Pallas (Triton lowering) flash-style prefill attention over the unified pool, grouped-query heads.

A prefill chunk's queries attend to the sequence's cached pages and to the chunk's own keys (not yet
in the pool: write_kv stores them after the layer loop), causally by position, with an optional
sliding window. One program per (sequence, KV head, block of BQ query tokens): the group's G query
heads of those tokens form one [BQ * GP, Dh] tile (GP: G padded to a power of two), and keys come in
[BK, Dh] tiles - gathered from the sequence's pages, then sliced from the chunk - with scores and
values as tensor-core dots and an online softmax per row. Cached blocks past the sequence's length
and chunk blocks past the query block are not read. When the chunk is whole blocks long and G a power
of two (Llama-2's 32/32 heads, Llama-3's 32/8 at 256-token chunks), the kernel reads q and the chunk's
K/V and writes its output in the caller's [B, T, H, Dh] layout: no pad, transpose or slice launches
around it (on the H100 those were 4 per layer, ~0.4 ms of a 256-token chunk step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention.tiles import NEG_INF, key_units, online_softmax_step


@dataclasses.dataclass(frozen=True)
class PrefillTunables:
    block_queries: int = 16  # query tokens per program (times GP rows)
    pages_per_block: int = 4  # cached keys per tile: pages_per_block * page_size
    block_keys: int = 64  # chunk keys per tile
    num_warps: int = 4
    num_stages: int = 2
    # query blocks halve (down to a 16-row tile) until the grid has at least this many programs (0: as
    # block_queries gives): one sequence's 128-token chunk on 32 KV heads is 64 programs at 64 queries
    min_programs: int = 0
    # a mixed step's decode rows and this chunk's queries in one launch (mixed_kernel.py) where both take
    # their tensor-core kernels in place; off: not yet measured
    mixed_launch: bool = False


# (page_size, head_dim, query heads per KV head) -> tunables, from bench/kernels/attention.py on the
# H100 (2026-11-26; 8 sequences, 256-token chunks over 1,024 cached keys; reference 1,002 / 943 us):
# MHA 32/32 block_queries 16/32/64 with 4 warps: 561 / 534 / 307 us; GQA 32/8: 233 / 190 / 561 us.
# About 64-128 rows of queries per program serve both.
TUNED: dict[tuple[int, int, int], PrefillTunables] = {
    (16, 128, 1): PrefillTunables(block_queries=64, num_warps=4),
    (16, 128, 4): PrefillTunables(block_queries=32, num_warps=4),
}


def tunables_for(page_size: int, head_dim: int, group: int) -> PrefillTunables:
    return TUNED.get((page_size, head_dim, group), PrefillTunables())


def _pow2_at_most(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def _prefill_kernel(*refs, **static):
    """One program per (sequence, KV head, query block) (prefill_program)."""
    o_ref = refs[-1]  # (..., o_ref) or (..., out_ref, o_ref): out aliased to o, its other rows kept
    ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))
    prefill_program(*ids, *refs[:9], o_ref, **static)


def prefill_program(
    b,
    h,
    qb,
    layer_ref,
    pt_ref,
    pos_ref,
    clen_ref,
    nlen_ref,
    q_ref,
    kn_ref,
    vn_ref,
    pool_ref,
    o_ref,
    *,
    gp,
    block_q,
    page_size,
    page_units,
    n_kv,
    cached_keys,
    chunk_keys,
    n_table,
    window,
    scale,
    f32_dot,
    direct,
    seq_len,
    row_start,
):
    """Query block qb of sequence b's KV group h."""
    row0 = row_start + b * seq_len  # direct: sequence b's first row in q, k_new, v_new and the output
    layer = layer_ref[0]
    clen, nlen = clen_ref[b], nlen_ref[b]
    rows = block_q * gp
    t0 = qb * block_q
    dh = q_ref.shape[-1]
    if direct:  # q, k_new, v_new, out as the caller has them, [rows, H, Dh]; gp == group
        q = q_ref[pl.ds(row0 + t0, block_q), pl.ds(h * gp, gp), :].reshape(rows, dh)
    else:
        q = q_ref[b, h, pl.ds(t0 * gp, rows), :]  # [R, Dh]; row r is token t0 + r // gp
    q_tok = t0 + jnp.arange(rows, dtype=jnp.int32) // gp
    q_pos = pos_ref[b, q_tok]  # [R]

    def update(carry, kt, vt, ok):
        return online_softmax_step(carry, q, kt, vt, ok, scale=scale, f32=f32_dot)

    ckey = jnp.arange(cached_keys, dtype=jnp.int32)

    def cached_block(i, carry):
        kpos = i * cached_keys + ckey
        units = key_units(
            pt_ref, b, h, kpos, page_size=page_size, page_units=page_units, n_kv=n_kv, n_table=n_table
        )
        ok = (kpos < clen)[None, :] & (kpos[None, :] <= q_pos[:, None])
        if window is not None:
            ok = ok & (q_pos[:, None] - kpos[None, :] < window)
        return update(carry, pool_ref[layer, units, :], pool_ref[layer, units + n_kv, :], ok)

    nkey = jnp.arange(chunk_keys, dtype=jnp.int32)

    def chunk_block(i, carry):
        j0 = i * chunk_keys
        j = j0 + nkey
        kpos = pos_ref[b, j]
        ok = (j < nlen)[None, :] & (kpos[None, :] <= q_pos[:, None])
        if window is not None:
            ok = ok & (q_pos[:, None] - kpos[None, :] < window)
        if direct:
            kt = kn_ref[pl.ds(row0 + j0, chunk_keys), h, :]
            vt = vn_ref[pl.ds(row0 + j0, chunk_keys), h, :]
        else:
            kt, vt = kn_ref[b, h, pl.ds(j0, chunk_keys), :], vn_ref[b, h, pl.ds(j0, chunk_keys), :]
        return update(carry, kt, vt, ok)

    carry = (
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, dh), jnp.float32),
    )
    start = jnp.int32(0)
    if window is not None:
        start = jnp.maximum(pos_ref[b, t0] - window + 1, 0) // cached_keys
    n_cached = (jnp.minimum(clen, n_table * page_size) + cached_keys - 1) // cached_keys
    carry = jax.lax.fori_loop(start, n_cached, cached_block, carry)
    n_chunk = (jnp.minimum(t0 + block_q, nlen) + chunk_keys - 1) // chunk_keys
    m, denom, acc = jax.lax.fori_loop(0, n_chunk, chunk_block, carry)
    out = (acc / jnp.maximum(denom, 1e-30)[:, None]).astype(o_ref.dtype)
    if direct:
        o_ref[pl.ds(row0 + t0, block_q), pl.ds(h * gp, gp), :] = out.reshape(block_q, gp, dh)
    else:
        o_ref[b, h, pl.ds(t0 * gp, rows), :] = out


def _shapes(t: int, group: int, tunables: PrefillTunables, heads: int = 0) -> tuple[int, int, int, int]:
    """(GP, query block, chunk key block, T padded to whole blocks) of a chunk of t tokens; heads (the
    grid's sequences x KV heads), if given, lets tunables.min_programs shrink the query block. A smaller
    power-of-two block divides the larger one, so T padded stays whole blocks."""
    gp = 1 << (group - 1).bit_length()
    block_q = _pow2_at_most(t, tunables.block_queries)
    while block_q * gp < 16:  # tensor-core tiles need 16+ rows
        block_q *= 2
    chunk_keys = max(16, _pow2_at_most(t, tunables.block_keys))
    tp = -(-t // max(block_q, chunk_keys)) * max(block_q, chunk_keys)  # whole query and key blocks
    while heads and heads * (tp // block_q) < tunables.min_programs and (block_q // 2) * gp >= 16:
        block_q //= 2
    return gp, block_q, chunk_keys, tp


def prefill_direct(t: int, group: int, tunables: PrefillTunables) -> bool:
    """Whether chunks of t tokens are whole blocks and the group a power of two: then the kernel reads
    q, k_new, v_new and writes its output in the caller's layout (no pad, transpose or slice launches
    around it), and can work on rows of larger arrays (paged_prefill_attention_rows)."""
    gp, _, _, tp = _shapes(t, group, tunables)
    return tp == t and gp == group


def prefill_plan(
    t: int, hkv: int, group: int, table_shape: tuple[int, int], dh: int, pool_dtype, page_size: int,
    sliding_window: int | None, tunables: PrefillTunables, row_start: int, direct: bool,
) -> tuple[tuple[int, int, int], dict]:  # fmt: skip
    """The grid (sequence, KV head, query block) and prefill_program's static arguments of B chunks of t
    tokens over [B, P] page tables."""
    b, n_table = table_shape
    gp, block_q, chunk_keys, tp = _shapes(t, group, tunables, heads=b * hkv)
    ppb = _pow2_at_most(n_table, tunables.pages_per_block)
    static = dict(
        gp=gp,
        block_q=block_q,
        page_size=page_size,
        page_units=page_size * 2 * hkv,
        n_kv=hkv,
        cached_keys=max(16, ppb * page_size),
        chunk_keys=chunk_keys,
        n_table=n_table,
        window=sliding_window,
        scale=1.0 / float(dh) ** 0.5,
        f32_dot=pool_dtype == jnp.float32,
        direct=direct,
        seq_len=t,
        row_start=row_start,
    )
    return (b, hkv, tp // block_q), static


def _launch(
    qg, kn, vn, pool, layer, page_tables, pos, cached_lens, new_lens, out, *, t, hkv, group, row_start,
    direct, out_shape, page_size, sliding_window, tunables, interpret,
):  # fmt: skip
    """The pallas_call over q/k/v as laid out for it (direct: the caller's rows; else padded and
    transposed); out, if given, is aliased to the output (its rows outside this batch's kept)."""
    grid, static = prefill_plan(
        t, hkv, group, page_tables.shape, pool.shape[2], pool.dtype, page_size, sliding_window, tunables, row_start,
        direct,
    )  # fmt: skip
    kernel = functools.partial(_prefill_kernel, **static)
    args = [
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        page_tables,
        pos,
        cached_lens,
        new_lens,
        qg,
        kn,
        vn,
        pool,
    ]
    aliases = {}
    if out is not None:
        aliases = {len(args): 0}
        args.append(out.astype(qg.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, qg.dtype),
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=tunables.num_warps, num_stages=tunables.num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(*args)


@functools.partial(jax.jit, static_argnames=("page_size", "sliding_window", "tunables", "interpret"))
def paged_prefill_attention_kernel(
    q: jax.Array,  # [B, T, Hq, Dh]
    k_new: jax.Array,  # [B, T, Hkv, Dh] the chunk's keys (not yet in the pool)
    v_new: jax.Array,  # [B, T, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32
    positions: jax.Array,  # [B, T] int32
    cached_lens: jax.Array,  # [B] int32 keys already in the pool
    new_lens: jax.Array,  # [B] int32 real tokens of the chunk
    *,
    page_size: int,
    sliding_window: int | None = None,
    tunables: PrefillTunables = PrefillTunables(),
    interpret: bool = False,
) -> jax.Array:  # [B, T, Hq, Dh]; rows past new_lens are unspecified
    b, t, hq, dh = q.shape
    hkv = k_new.shape[2]
    group = hq // hkv
    gp, _, _, tp = _shapes(t, group, tunables)
    kw = dict(page_size=page_size, sliding_window=sliding_window, interpret=interpret, tunables=tunables)
    if prefill_direct(t, group, tunables):  # the batch as the rows of flat [B*T, H, Dh] arrays
        flat = [x.reshape(b * t, x.shape[2], dh) for x in (q, k_new, v_new)]
        args = (pool, layer, page_tables, positions, cached_lens, new_lens)
        out = paged_prefill_attention_rows(*flat, *args, None, row_start=0, **kw)
        return out.reshape(b, t, hq, dh)
    pad_t = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    qg = jnp.pad(q.reshape(b, t, hkv, group, dh), ((0, 0), (0, tp - t), (0, 0), (0, gp - group), (0, 0)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(b, hkv, tp * gp, dh)  # row = token * gp + head in group
    kn = jnp.pad(k_new, pad_t).transpose(0, 2, 1, 3)  # [B, Hkv, Tp, Dh]
    vn = jnp.pad(v_new, pad_t).transpose(0, 2, 1, 3)
    pos = jnp.pad(positions, ((0, 0), (0, tp - t)))
    out = _launch(
        qg,
        kn,
        vn,
        pool,
        layer,
        page_tables,
        pos,
        cached_lens,
        new_lens,
        None,
        t=t,
        hkv=hkv,
        group=group,
        row_start=0,
        direct=False,
        out_shape=(b, hkv, tp * gp, dh),
        **kw,
    )
    out = out.reshape(b, hkv, tp, gp, dh)[:, :, :t, :group].transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, hq, dh)


@functools.partial(
    jax.jit, static_argnames=("page_size", "sliding_window", "tunables", "interpret", "row_start")
)
def paged_prefill_attention_rows(
    q: jax.Array,  # [N, Hq, Dh]: sequence b's chunk is rows row_start + b * T .. + T
    k_new: jax.Array,  # [N, Hkv, Dh]
    v_new: jax.Array,  # [N, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32
    positions: jax.Array,  # [B, T] int32
    cached_lens: jax.Array,  # [B] int32
    new_lens: jax.Array,  # [B] int32
    out: jax.Array | None,  # [N, Hq, Dh] written in place at the batch's rows (others kept), or None
    *,
    row_start: int,
    page_size: int,
    sliding_window: int | None = None,
    tunables: PrefillTunables = PrefillTunables(),
    interpret: bool = False,
) -> jax.Array:  # [N, Hq, Dh]: the batch's rows written (the others: out's, else unspecified)
    """paged_prefill_attention_kernel on a [B, T] batch that is rows of larger arrays (a mixed step's
    tokens): no slice of q/k/v and no join of outputs. Needs prefill_direct(T, group, tunables)."""
    n, hq, dh = q.shape
    b, t = positions.shape
    hkv = k_new.shape[1]
    group = hq // hkv
    if not prefill_direct(t, group, tunables):
        raise ValueError(f"chunks of {t} tokens with groups of {group} heads are not whole kernel blocks")
    if row_start < 0 or row_start + b * t > n:
        raise ValueError(f"rows [{row_start}, {row_start + b * t}) are not within q's {n} rows")
    if out is not None and out.shape != q.shape:
        raise ValueError(f"out {out.shape} must be q's shape {q.shape}")
    return _launch(
        q,
        k_new,
        v_new,
        pool,
        layer,
        page_tables,
        positions,
        cached_lens,
        new_lens,
        out,
        t=t,
        hkv=hkv,
        group=group,
        row_start=row_start,
        direct=True,
        out_shape=(n, hq, dh),
        page_size=page_size,
        sliding_window=sliding_window,
        tunables=tunables,
        interpret=interpret,
    )
