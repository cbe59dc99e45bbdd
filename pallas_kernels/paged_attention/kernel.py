"""Pallas (Triton lowering) paged decode attention over the unified pool, grouped-query heads.

Pool: [L, U, Dh]; token slot s of page p keeps its K heads at units p*PU + s*2*Hkv + [0, Hkv) and its V
heads right after (PU = page_size * 2 * Hkv). One program per (sequence, KV head): it walks the
sequence's pages `pages_per_block` at a time (a gathered [block_keys, Dh] tile of K and of V per
block, read once and shared by the G query heads of the group), keeps an online softmax per query
head, and finishes with the step's own K/V, which are not in the pool yet (write_kv stores them after
the layer loop). Only blocks below the sequence's length are read: the bytes are the KV actually
cached, not the page-table width.
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
class AttentionTunables:
    pages_per_block: int = 4
    num_warps: int = 4
    num_stages: int = 2
    # tensor-core variant: the G query heads of a KV group as one [16+, Dh] tile, scores and values by
    # dots. False: a vector loop per query head, compute-bound for GQA. H200, batch 64, context 2,048:
    # 32/8 heads 367 -> 151 us (33% -> 86% of read bandwidth); 32/32 heads 574 -> 533 us
    mma: bool = True
    # tensor-core variant: keys a program walks at most (a multiple of its block; 0: all of a sequence's).
    # With a split, programs (sequence, KV head, split) each write a partial softmax and a combine
    # merges them (flash-decoding): more, shorter programs for few sequences of short contexts, where a
    # serving step's decode attention runs latency-bound (H200, 17 x ~440 keys: 2.7 TB/s)
    split_keys: int = 0
    # tensor-core variant: programs launched longest sequence first (the grid walks the sequences in
    # order of decreasing cached length, KV heads fastest), so that a step's ragged lengths leave short
    # programs, not long ones, for the last wave
    longest_first: bool = False
    # split_keys and longest_first (the tunings for a ragged step's short contexts) only where the page
    # table spans at most this many keys (0: any table). At T6's batch 64 of 2,048 keys every program is
    # long already: a 512-key split costs 6% (MHA, 509 -> 539 us) and 20% (GQA, 149 -> 178 us) there
    ragged_max_table_keys: int = 0
    # batches of at most small_batch_rows rows (0: none) whose table is ragged as above take
    # small_pages_per_block (0: pages_per_block) and small_split_keys instead: their programs are few and
    # short, so larger blocks keep more bytes in flight and splits more programs busy. H200, ncu, trace
    # lengths in a 5 GiB pool (Llama-2-7B heads): 4 rows of 8 21.2 -> 17.2 us, 9 rows of 16 33.1 -> 23.5
    # us with 8 pages and 512-key splits; at 17 rows of 32 8 pages alone 41.7 -> 38.7 us but 512-key
    # splits 42.2, and at 28 rows of 32 8 pages 55.2 against 4's 52.4: the 32-row bucket keeps 4 pages
    small_batch_rows: int = 0
    small_pages_per_block: int = 0
    small_split_keys: int = 0
    # split kernels only: the grid walks a work list of (sequence, split) items, each sequence's real
    # splits packed first (at least one a sequence, for its own key), instead of every sequence times
    # the table's splits; programs past the list write nothing and the combine masks what they skipped.
    # Off: measured slower as a whole step. H200, ncu, the kernel alone with 256-key splits: 17 rows of 32
    # 41.1 -> 37.6 us, 4 rows of 16 18.2 -> 15.0, 28 rows 52.4 -> 53.7; but the combine's two fusions a
    # layer cost more than that: trace-shaped 17-row decode steps 5.583 -> 5.595 ms (bench/RESULTS.md)
    work_list: bool = False


# (page_size, head_dim) -> tunables, from bench/kernels/attention.py on the H200 (2026-11-26). The ragged
# step's tunings from trace-shaped decode steps on the H200 (bench.mixed_step --decode-lengths trace,
# 2026-12-04: 17 rows of 8 to ~1,000 keys in 1,408-key tables, Llama-2-7B heads), decode attention per
# step: 1.485 / 1.488 ms as tuned before; split by 256 keys 1.339 + 0.084 (the combine); by 512 keys
# 1.324 + 0.063; longest first, unsplit, 1.344 (the step 5.88 -> 5.70 ms in the same call). At T6's
# 2,048-key tables longest first buys nothing (MHA within noise; GQA 152.5 -> 157.6 us,
# kernels-attention-20261204T025947.json), so it stays within 1,536-key tables
TUNED: dict[tuple[int, int], AttentionTunables] = {
    (16, 128): AttentionTunables(
        pages_per_block=4,
        num_warps=4,
        mma=True,
        longest_first=True,
        ragged_max_table_keys=1536,
        small_batch_rows=16,
        small_pages_per_block=8,
        small_split_keys=512,
    )
}


def tunables_for(page_size: int, head_dim: int) -> AttentionTunables:
    return TUNED.get((page_size, head_dim), AttentionTunables())


def _decode_kernel(
    layer_ref,
    pt_ref,
    pos_ref,
    clen_ref,
    q_ref,
    kn_ref,
    vn_ref,
    pool_ref,
    *refs,
    row_start,
    group,
    page_size,
    page_units,
    n_kv,
    block_keys,
    n_table,
    window,
    scale,
):
    o_ref = refs[-1]  # (o_ref,) or (out_ref, o_ref): out aliased to o, its other rows kept
    b = pl.program_id(0)
    h = pl.program_id(1)
    row = row_start + b
    layer = layer_ref[0]
    pos = pos_ref[b]
    clen = clen_ref[b]
    dh = pool_ref.shape[2]
    qs = [q_ref[row, h * group + g, :].astype(jnp.float32) * scale for g in range(group)]  # G x [Dh]
    key = jnp.arange(block_keys, dtype=jnp.int32)

    def block(i, carry):
        k0 = i * block_keys
        kpos = k0 + key  # [BK] position of each key
        units = key_units(
            pt_ref, b, h, kpos, page_size=page_size, page_units=page_units, n_kv=n_kv, n_table=n_table
        )
        kt = pool_ref[layer, units, :].astype(jnp.float32)  # [BK, Dh]
        vt = pool_ref[layer, units + n_kv, :].astype(jnp.float32)
        ok = (kpos < clen) & (kpos <= pos)
        if window is not None:
            ok = ok & (pos - kpos < window)
        out = []
        for g in range(group):
            m, denom, acc = carry[g]
            s = jnp.where(ok, jnp.sum(kt * qs[g][None, :], axis=1), NEG_INF)  # [BK]
            m_new = jnp.maximum(m, jnp.max(s, axis=0))
            p = jnp.exp(s - m_new)
            alpha = jnp.exp(m - m_new)
            out.append(
                (m_new, denom * alpha + jnp.sum(p, axis=0), acc * alpha + jnp.sum(p[:, None] * vt, axis=0))
            )
        return tuple(out)

    init = tuple(
        (jnp.float32(NEG_INF), jnp.float32(0.0), jnp.zeros((dh,), jnp.float32)) for _ in range(group)
    )
    n_blocks = (jnp.minimum(clen, n_table * page_size) + block_keys - 1) // block_keys
    start = jnp.int32(0)
    if window is not None:
        start = jnp.maximum(pos - window + 1, 0) // block_keys
    carry = jax.lax.fori_loop(start, n_blocks, block, init)

    kn = kn_ref[row, h, :].astype(jnp.float32)
    vn = vn_ref[row, h, :].astype(jnp.float32)
    for g in range(group):
        m, denom, acc = carry[g]
        s = jnp.sum(kn * qs[g], axis=0)
        m_new = jnp.maximum(m, s)
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        out = (acc * alpha + p * vn) / (denom * alpha + p)
        o_ref[row, h * group + g, :] = out.astype(o_ref.dtype)


def _attend_group(
    layer_ref,
    pt_ref,
    pos_ref,
    clen_ref,
    q_ref,
    kn_ref,
    vn_ref,
    pool_ref,
    *,
    b,
    h,
    span,
    own,
    row_start,
    page_size,
    page_units,
    n_kv,
    block_keys,
    n_table,
    window,
    scale,
    f32_dot,
    group,
    gp,
):
    """Sequence b's KV group h as a tile of GP >= 16 query rows (rows past the group repeat its last
    head: the same values, computed again): the online softmax over the key blocks span(start, n_blocks)
    gives of the sequence's [start, n_blocks), then the step's own key and value where own (a bool, or a
    traced one). Returns the query heads [GP] and the unnormalised (m [GP], denom [GP], acc [GP, Dh])."""
    row = row_start + b
    layer = layer_ref[0]
    pos = pos_ref[b]
    clen = clen_ref[b]
    heads = h * group + jnp.minimum(jnp.arange(gp, dtype=jnp.int32), group - 1)  # [GP]
    q = q_ref[row, heads, :]  # [GP, Dh]
    dh = q.shape[1]
    key = jnp.arange(block_keys, dtype=jnp.int32)

    def block(i, carry):
        kpos = i * block_keys + key
        units = key_units(
            pt_ref, b, h, kpos, page_size=page_size, page_units=page_units, n_kv=n_kv, n_table=n_table
        )
        ok = (kpos < clen) & (kpos <= pos)
        if window is not None:
            ok = ok & (pos - kpos < window)
        kt, vt = pool_ref[layer, units, :], pool_ref[layer, units + n_kv, :]
        return online_softmax_step(carry, q, kt, vt, ok[None, :], scale=scale, f32=f32_dot)

    init = (
        jnp.full((gp,), NEG_INF, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        jnp.zeros((gp, dh), jnp.float32),
    )
    n_blocks = (jnp.minimum(clen, n_table * page_size) + block_keys - 1) // block_keys
    start = jnp.int32(0)
    if window is not None:
        start = jnp.maximum(pos - window + 1, 0) // block_keys
    m, denom, acc = jax.lax.fori_loop(*span(start, n_blocks), block, init)

    kn = kn_ref[row, h, :].astype(jnp.float32)  # the step's own key and value
    vn = vn_ref[row, h, :].astype(jnp.float32)
    s = jnp.sum(q.astype(jnp.float32) * kn[None, :], axis=1) * scale  # [GP]
    if own is True:
        m_new = jnp.maximum(m, s)
        p = jnp.exp(s - m_new)
    else:  # a part without the own key keeps its (possibly empty: m = -inf) softmax as it is
        m_new = jnp.where(own, jnp.maximum(m, s), m)
        p = jnp.where(own, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return heads, (m_new, denom * alpha + p, acc * alpha[:, None] + p[:, None] * vn[None, :])


def _grid_position(refs, ordered: bool, n_axes: int):
    """(sequence, other grid axes) of this program. Unordered grids are (sequence, KV head[, split]);
    ordered ones (KV head[, split], rank) run the sequence of that rank in decreasing cached length
    (refs[8]: the order), so the programs of the longest sequences launch first."""
    if not ordered:
        return pl.program_id(0), [pl.program_id(i) for i in range(1, n_axes)]
    return refs[8][pl.program_id(n_axes - 1)], [pl.program_id(i) for i in range(n_axes - 1)]


def decode_mma_program(refs, o_ref, b, h, *, row_start, **static) -> None:
    """Sequence b's KV group h (refs: the kernel's eight inputs): the group's query heads read and
    written in place, so no padded copy of q and no slice of the output outside the kernel. Sequence b's
    query, key, value and output are row row_start + b of q, k_new, v_new and the output."""
    heads, (_, denom, acc) = _attend_group(
        *refs,
        b=b,
        h=h,
        span=lambda start, n_blocks: (start, n_blocks),
        own=True,
        row_start=row_start,
        **static,
    )
    o_ref[row_start + b, heads, :] = (acc / denom[:, None]).astype(o_ref.dtype)


def _decode_mma_kernel(*refs, ordered, **static):
    """One program per (sequence, KV head) (decode_mma_program)."""
    o_ref = refs[-1]  # (..., o_ref) or (..., out_ref, o_ref): out aliased to o, its other rows kept
    b, (h,) = _grid_position(refs, ordered, 2)
    decode_mma_program(refs[:8], o_ref, b, h, **static)


def write_split(refs, b, h, sp, *, split_blocks, **static) -> None:
    """Split sp of sequence b's KV group h: the walk over the split's blocks only, written as a partial
    softmax (unnormalised acc [GP, Dh], running max m and sum denom per query head) at [b, sp]; the
    step's own key and value join split 0. A split past the sequence writes an empty partial (m = -inf,
    denom = 0)."""
    acc_ref, m_ref, denom_ref = refs[-3:]
    heads, (m, denom, acc) = _attend_group(
        *refs[:8],
        b=b,
        h=h,
        span=lambda start, n_blocks: (
            jnp.maximum(start, sp * split_blocks),
            jnp.minimum(n_blocks, (sp + 1) * split_blocks),
        ),
        own=sp == 0,
        **static,
    )
    acc_ref[b, sp, heads, :] = acc
    m_ref[b, sp, heads] = m
    denom_ref[b, sp, heads] = denom


def _decode_split_kernel(*refs, ordered, **static):
    """One program per (sequence, KV head, split), every split of every sequence (write_split)."""
    b, (h, sp) = _grid_position(refs, ordered, 3)
    write_split(refs, b, h, sp, **static)


def _decode_items_kernel(*refs, **static):
    """One program per (KV head, work item): item i is split refs[9][i] of sequence refs[8][i]
    (write_split); items past the count (refs[10]) write nothing."""
    row_ref, split_ref, count_ref = refs[8:11]
    h, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i < count_ref[0])
    def _():
        write_split(refs, row_ref[i], h, split_ref[i], **static)


def work_items(
    cached_lens: jax.Array, *, block_keys: int, split_blocks: int, splits: int, table_keys: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The split kernel's work list: each sequence's splits over its cached keys (at least one, which
    holds its own key), packed sequence after sequence. (row [B*S], split [B*S], count [1], splits per
    sequence [B]); entries past count repeat the last sequence's last split and are not run."""
    b = cached_lens.shape[0]
    blocks = (jnp.minimum(cached_lens, table_keys) + block_keys - 1) // block_keys
    per_row = jnp.clip((blocks + split_blocks - 1) // split_blocks, 1, splits).astype(jnp.int32)
    starts = jnp.cumsum(per_row) - per_row
    i = jnp.arange(b * splits, dtype=jnp.int32)
    row = jnp.clip(jnp.searchsorted(starts, i, side="right") - 1, 0, b - 1).astype(jnp.int32)
    split = jnp.minimum(i - starts[row], per_row[row] - 1).astype(jnp.int32)
    return row, split, jnp.sum(per_row).reshape(1).astype(jnp.int32), per_row


def combine_splits(
    acc: jax.Array, m: jax.Array, denom: jax.Array, splits_per_row: jax.Array | None = None
) -> jax.Array:
    """The partial softmaxes of a sequence's splits merged: acc [B, S, Hq, Dh], m and denom [B, S, Hq]
    -> [B, Hq, Dh] float32. Split 0 holds the step's own key, so every row's maximum is finite. With
    splits_per_row [B], splits at or past a row's count were never written and are left out."""
    if splits_per_row is not None:
        valid = jnp.arange(m.shape[1])[None, :] < splits_per_row[:, None]  # [B, S]
        m = jnp.where(valid[..., None], m, NEG_INF)
        denom = jnp.where(valid[..., None], denom, 0.0)
        acc = jnp.where(valid[..., None, None], acc, 0.0)
    top = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp(m - top)  # empty splits: m = -inf -> 0
    return jnp.sum(w[..., None] * acc, axis=1) / jnp.sum(w * denom, axis=1)[..., None]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """A decode batch's launch: the tunables it takes (a small ragged batch's own), the kernels' static
    arguments (common: every kernel's; tiles: the tensor-core kernels', with `ordered`), whether the
    grid walks the sequences longest first, and the key splits (splits 0: unsplit)."""

    tunables: AttentionTunables
    common: dict
    tiles: dict
    ordered: bool
    split_blocks: int
    splits: int


def decode_plan(
    hq: int, hkv: int, dh: int, b: int, p: int, pool_dtype, page_size: int, sliding_window: int | None,
    tunables: AttentionTunables, row_start: int,
) -> DecodePlan:  # fmt: skip
    """The launch of B sequences' decode attention over [B, P] page tables."""
    ragged = not tunables.ragged_max_table_keys or p * page_size <= tunables.ragged_max_table_keys
    if ragged and b <= tunables.small_batch_rows:  # a small batch: its own block and split
        tunables = dataclasses.replace(
            tunables,
            pages_per_block=tunables.small_pages_per_block or tunables.pages_per_block,
            split_keys=tunables.small_split_keys,
        )
    ppb = 1  # pages per block: a power of two (Triton tiles); the last block may run past the table
    while ppb * 2 <= min(tunables.pages_per_block, p):
        ppb *= 2
    group = hq // hkv
    common = dict(
        page_size=page_size,
        page_units=page_size * 2 * hkv,
        n_kv=hkv,
        block_keys=ppb * page_size,
        n_table=p,
        window=sliding_window,
        scale=1.0 / float(dh) ** 0.5,
        row_start=row_start,
    )
    ordered = tunables.mma and tunables.longest_first and ragged
    # the tensor-core kernels' shared arguments: the group's query heads as a tile of 16+ rows
    tiles = dict(
        common,
        f32_dot=pool_dtype == jnp.float32,
        group=group,
        gp=max(16, 1 << (group - 1).bit_length()),
        ordered=ordered,
    )
    table_blocks = -(-p * page_size // common["block_keys"])
    split_blocks = max(1, tunables.split_keys // common["block_keys"])
    split = tunables.mma and tunables.split_keys and ragged and table_blocks > split_blocks
    splits = -(-table_blocks // split_blocks) if split else 0
    return DecodePlan(tunables, common, tiles, ordered, split_blocks, splits)


def decode_order(cached_lens: jax.Array) -> jax.Array:
    """The sequences by decreasing cached length (ties in row order): an ordered grid walks them."""
    return jnp.argsort(-cached_lens, stable=True).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("page_size", "sliding_window", "tunables", "interpret", "row_start")
)
def paged_decode_attention_kernel(
    q: jax.Array,  # [N, Hq, Dh] one query per sequence: sequence b's is row row_start + b
    k_new: jax.Array,  # [N, Hkv, Dh] the step's own key (not yet in the pool)
    v_new: jax.Array,  # [N, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    page_tables: jax.Array,  # [B, P] int32
    positions: jax.Array,  # [B] int32 the query's position
    cached_lens: jax.Array,  # [B] int32 keys already in the pool
    *,
    page_size: int,
    sliding_window: int | None = None,
    tunables: AttentionTunables = AttentionTunables(),
    interpret: bool = False,
    row_start: int = 0,
    out: jax.Array | None = None,  # [N, Hq, Dh]: written in place at the sequences' rows, others kept
) -> jax.Array:  # [N, Hq, Dh]: rows row_start .. + B written (the others: out's, else unspecified)
    n, hq, dh = q.shape
    b = page_tables.shape[0]
    hkv = k_new.shape[1]
    p = page_tables.shape[1]
    plan = decode_plan(hq, hkv, dh, b, p, pool.dtype, page_size, sliding_window, tunables, row_start)
    tunables, common, tiles, ordered = plan.tunables, plan.common, plan.tiles, plan.ordered
    if row_start < 0 or row_start + b > n:
        raise ValueError(f"rows [{row_start}, {row_start + b}) are not within q's {n} rows")
    args = [
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        page_tables,
        positions,
        cached_lens,
        q,
        k_new,
        v_new,
        pool,
    ]
    aliases = {}
    if out is not None:
        if out.shape != q.shape:
            raise ValueError(f"out {out.shape} must be q's shape {q.shape}")
        aliases = {len(args): 0}
        args.append(out.astype(q.dtype))
    params = pltriton.CompilerParams(num_warps=tunables.num_warps, num_stages=tunables.num_stages)
    order = [decode_order(cached_lens)] if ordered else []
    split_blocks, splits = plan.split_blocks, plan.splits
    if splits:
        out_shape = (
            jax.ShapeDtypeStruct((b, splits, hq, dh), jnp.float32),
            jax.ShapeDtypeStruct((b, splits, hq), jnp.float32),
            jax.ShapeDtypeStruct((b, splits, hq), jnp.float32),
        )
        per_row = None
        if tunables.work_list:
            row, split, count, per_row = work_items(
                cached_lens,
                block_keys=common["block_keys"],
                split_blocks=split_blocks,
                splits=splits,
                table_keys=p * page_size,
            )
            items = {k: v for k, v in tiles.items() if k != "ordered"}
            acc, m, denom = pl.pallas_call(
                functools.partial(_decode_items_kernel, **items, split_blocks=split_blocks),
                out_shape=out_shape,
                grid=(hkv, b * splits),
                compiler_params=params,
                interpret=interpret,
                name="paged_decode_attention_items",
            )(*args[:8], row, split, count)
        else:
            part = functools.partial(_decode_split_kernel, **tiles, split_blocks=split_blocks)
            acc, m, denom = pl.pallas_call(
                part,
                out_shape=out_shape,
                grid=(hkv, splits, b) if ordered else (b, hkv, splits),
                compiler_params=params,
                interpret=interpret,
                name="paged_decode_attention_split",
            )(*args[:8], *order)
        merged = combine_splits(acc, m, denom, per_row).astype(q.dtype)
        if out is None and row_start == 0 and b == n:
            return merged
        base = out.astype(q.dtype) if out is not None else jnp.zeros(q.shape, q.dtype)
        return jax.lax.dynamic_update_slice(base, merged, (row_start, 0, 0))
    if tunables.mma:
        kernel = functools.partial(_decode_mma_kernel, **tiles)
        name = "paged_decode_attention_mma"
    else:
        kernel = functools.partial(_decode_kernel, group=hq // hkv, **common)
        name = "paged_decode_attention"
    if ordered:  # the order goes after the eight inputs, before the aliased output
        args = args[:8] + order + args[8:]
        aliases = {k + 1: v for k, v in aliases.items()}
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, hq, dh), q.dtype),
        grid=(hkv, b) if ordered else (b, hkv),
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*args)
