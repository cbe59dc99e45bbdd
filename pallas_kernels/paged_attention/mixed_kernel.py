"""A mixed step's attention in one launch (PrefillTunables.mixed_launch): the prompt chunk's prefill
programs and the decode rows' programs side by side in one 1-D grid, where apart they take a launch
each a layer (the chunk's ~0.41 ms a 128-token chunk step on the H200, ~13 us a layer beside the
decode rows' ~40).

The prefill programs come first (the longer ones), then the decode programs, each body the separate
kernels' own (prefill_kernel.prefill_program; kernel.decode_mma_program, or kernel.write_split where
the decode batch splits its keys, whose partials are combined after the launch as apart). Both kinds
run on the prefill tunables' warps and stages. The decode batch takes its tensor-core kernel's plan,
ordered longest first or not; a work list (AttentionTunables.work_list) is not taken here."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grids import either_program, grid_index, grid_programs
from pallas_kernels.paged_attention.kernel import (
    AttentionTunables,
    combine_splits,
    decode_mma_program,
    decode_order,
    decode_plan,
    write_split,
)
from pallas_kernels.paged_attention.prefill_kernel import PrefillTunables, prefill_plan, prefill_program


def _mixed_attention_kernel(*refs, ordered, splits, pre_grid, pre_kw, dec_grid, dec_kw):
    """refs: layer, q, k_new, v_new, pool, the decode batch's page tables, positions, cached lengths,
    the prefill batch's page tables, positions, cached and new lengths, [the decode order], [out
    (aliased)], then the outputs: o [, acc, m, denom of the decode splits]."""
    layer, q, kn, vn, pool, pt_d, pos_d, clen_d, pt_p, pos_p, clen_p, nlen_p = refs[:12]
    o_ref = refs[-4] if splits else refs[-1]
    dec_refs = (layer, pt_d, pos_d, clen_d, q, kn, vn, pool)

    def decode(q_index):
        ids = grid_index(q_index, dec_grid)
        if ordered:  # (KV head[, split], rank): the rank-th longest sequence
            b, others = refs[12][ids[-1]], ids[:-1]
        else:  # (sequence, KV head[, split])
            b, others = ids[0], ids[1:]
        if splits:
            write_split((*dec_refs, *refs[-3:]), b, *others, **dec_kw)
        else:
            decode_mma_program(dec_refs, o_ref, b, *others, **dec_kw)

    either_program(
        pre_grid,
        lambda *ids: prefill_program(
            *ids, layer, pt_p, pos_p, clen_p, nlen_p, q, kn, vn, pool, o_ref, **pre_kw
        ),
        decode,
    )


def mixed_attention_supported(decode: AttentionTunables, prefill: PrefillTunables) -> bool:
    """Whether the chunk's tunables ask for the one launch and the decode batch's kernel can join it
    (the tensor-core kernel, without a work list)."""
    return prefill.mixed_launch and decode.mma and not decode.work_list


@functools.partial(
    jax.jit,
    static_argnames=(
        "page_size",
        "sliding_window",
        "decode_tunables",
        "prefill_tunables",
        "decode_row_start",
        "prefill_row_start",
        "interpret",
    ),
)
def paged_attention_mixed_kernel(
    q: jax.Array,  # [N, Hq, Dh]: the step's rows
    k_new: jax.Array,  # [N, Hkv, Dh]
    v_new: jax.Array,  # [N, Hkv, Dh]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    decode: tuple,  # (page_tables [Bd, Pd], positions [Bd], cached_lens [Bd]): rows decode_row_start ..
    prefill: tuple,  # (page_tables [Bp, Pp], positions [Bp, T], cached_lens, new_lens [Bp]): T rows each
    out: jax.Array | None,  # [N, Hq, Dh] written in place at both batches' rows (others kept), or None
    *,
    page_size: int,
    sliding_window: int | None,
    decode_tunables: AttentionTunables,
    prefill_tunables: PrefillTunables,
    decode_row_start: int,
    prefill_row_start: int,
    interpret: bool = False,
) -> jax.Array:  # [N, Hq, Dh]: both batches' rows written (the others: out's, else unspecified)
    """Both batches' attention in one launch. The caller checks mixed_attention_supported and that the
    chunks are whole prefill blocks (prefill_kernel.prefill_direct)."""
    n, hq, dh = q.shape
    hkv = k_new.shape[1]
    pt_d, pos_d, clen_d = decode
    pt_p, pos_p, clen_p, nlen_p = prefill
    b_dec, t = pt_d.shape[0], pos_p.shape[1]
    window = dict(page_size=page_size, sliding_window=sliding_window)
    dec = decode_plan(hq, hkv, dh, b_dec, pt_d.shape[1], pool.dtype, **window, tunables=decode_tunables,
                      row_start=decode_row_start)  # fmt: skip
    pre_grid, pre_kw = prefill_plan(
        t, hkv, hq // hkv, pt_p.shape, dh, pool.dtype, **window, tunables=prefill_tunables,
        row_start=prefill_row_start, direct=True,
    )  # fmt: skip
    dec_kw = {k: v for k, v in dec.tiles.items() if k != "ordered"}
    if dec.splits:
        dec_kw["split_blocks"] = dec.split_blocks
        dec_grid = (hkv, dec.splits, b_dec) if dec.ordered else (b_dec, hkv, dec.splits)
    else:
        dec_grid = (hkv, b_dec) if dec.ordered else (b_dec, hkv)
    args = [jnp.reshape(layer, (1,)).astype(jnp.int32), q, k_new, v_new, pool, pt_d, pos_d, clen_d, *prefill]
    if dec.ordered:
        args.append(decode_order(clen_d))
    aliases = {}
    if out is not None:
        aliases = {len(args): 0}
        args.append(out.astype(q.dtype))
    out_shape = [jax.ShapeDtypeStruct((n, hq, dh), q.dtype)]
    if dec.splits:
        out_shape += [
            jax.ShapeDtypeStruct((b_dec, dec.splits, hq, dh), jnp.float32),
            jax.ShapeDtypeStruct((b_dec, dec.splits, hq), jnp.float32),
            jax.ShapeDtypeStruct((b_dec, dec.splits, hq), jnp.float32),
        ]
    kernel = functools.partial(
        _mixed_attention_kernel,
        ordered=dec.ordered,
        splits=dec.splits,
        pre_grid=pre_grid,
        pre_kw=pre_kw,
        dec_grid=dec_grid,
        dec_kw=dec_kw,
    )
    res = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(grid_programs(pre_grid) + grid_programs(dec_grid),),
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(
            num_warps=prefill_tunables.num_warps, num_stages=prefill_tunables.num_stages
        ),
        interpret=interpret,
        name="paged_attention_mixed",
    )(*args)
    if not dec.splits:
        return res[0]
    merged = combine_splits(*res[1:]).astype(q.dtype)
    return jax.lax.dynamic_update_slice(res[0], merged, (decode_row_start, 0, 0))
