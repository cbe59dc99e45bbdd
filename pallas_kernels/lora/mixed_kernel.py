"""A mixed step's LoRA in two launches (LoraTunables.mixed_launch): the decode rows' BGMV and the prompt
chunk's SGMV share one shrink launch and one expand launch, where apart they take two each.

A mixed step's chunk pays ~7 us a launch for its SGMV (4 launches a layer for q/k/v and o beside the
decode rows' 4 BGMV; 0.93 ms a 128-token rank-64 chunk step on the H200, ~7x its bytes): every launch
is latency-bound, so the two kinds' programs are run side by side in one grid, each program taking
one kind's work by its index. The grid is 1-D: the SGMV's programs first (tensor-core tiles, the
longer ones), then the BGMV's. Each program body is the separate kernels' own (kernel.py's *_program
functions), so results are the same bit for bit as the two launches apart. Both kinds run on the
launch's one warp count (mixed_num_warps; 0: the SGMV's).

Expand: both kinds add their deltas into their own rows of the same y (aliased to the output)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grids import either_program, grid_index, grid_programs
from pallas_kernels.lora.kernel import (
    bgmv_expand_launch,
    bgmv_expand_program,
    bgmv_shrink_launch,
    bgmv_shrink_program,
    sgmv_expand_program,
    sgmv_launches,
    sgmv_shrink_program,
)
from pallas_kernels.lora.shapes import LoraTunables


def _mixed_shrink_kernel(
    layer_ref,
    tok_ref,
    a_dec_ref,
    a_pre_ref,
    x_ref,
    pool_ref,
    s_pre_ref,
    s_dec_ref,
    *,
    pre_grid,
    pre_kw,
    dec_kw,
):
    layer = layer_ref[0]
    either_program(
        pre_grid,
        lambda *ids: sgmv_shrink_program(*ids, layer, a_pre_ref, x_ref, pool_ref, s_pre_ref, **pre_kw),
        lambda q: bgmv_shrink_program(q, layer, tok_ref, a_dec_ref, x_ref, pool_ref, s_dec_ref, **dec_kw),
    )


def _mixed_expand_kernel(
    layer_ref, off_ref, b_dec_ref, s_dec_ref, b_pre_ref, s_pre_ref, pool_ref, y_ref, o_ref, *, pre_grid, pre_kw,
    dec_grid, dec_kw,
):  # fmt: skip
    layer = layer_ref[0]
    refs = (pool_ref, y_ref, o_ref)
    either_program(
        pre_grid,
        lambda *ids: sgmv_expand_program(*ids, layer, b_pre_ref, s_pre_ref, *refs, **pre_kw),
        lambda q: bgmv_expand_program(
            *grid_index(q, dec_grid), layer, off_ref, b_dec_ref, s_dec_ref, *refs, **dec_kw
        ),
    )


def mixed_num_warps(prefill_tunables: LoraTunables) -> int:
    """Warps of both mixed launches (mixed_num_warps; 0: the SGMV's)."""
    return prefill_tunables.mixed_num_warps or prefill_tunables.sgmv_num_warps


@functools.partial(
    jax.jit,
    static_argnames=(
        "h_outs",
        "max_rank",
        "rank",
        "seq_len",
        "decode_row_start",
        "prefill_row_start",
        "decode_tunables",
        "prefill_tunables",
        "interpret",
    ),
)
def bgmv_sgmv_rows_add(
    y: jax.Array,  # [N_all, sum(h_outs)]: both batches' deltas are added to their rows (aliased)
    x: jax.Array,  # [N_all, H_in]
    pool: jax.Array,  # [L, U, Dh]
    layer: jax.Array,  # [] int32
    token_index: jax.Array,  # decode: [G*K] int32, each projection's K grouped by token; padding: N
    a_dec: jax.Array,  # [G*K] int32; 0 for padding
    b_dec: jax.Array,  # [G*K] int32
    offsets: jax.Array,  # [G*(N+1)] int32
    a_pre: jax.Array,  # prefill: [B, RG] int32; 0 for padding rows
    b_pre: jax.Array,  # [B, RG] int32
    *,
    h_outs: tuple[int, ...],
    max_rank: int,  # the decode rows' rank bucket
    rank: int,  # the prompt chunks' rank bucket (a member's columns)
    seq_len: int,
    decode_row_start: int,
    prefill_row_start: int,
    decode_tunables: LoraTunables,
    prefill_tunables: LoraTunables,
    interpret: bool = False,
) -> jax.Array:  # y with the decode rows' BGMV deltas and the chunks' SGMV deltas added
    """The BGMV of N decode tokens (rows decode_row_start ..) and the SGMV of B sequences of seq_len
    tokens (rows prefill_row_start ..), G projections that read the same x, in one shrink launch and
    one expand launch. The caller checks that both would run their plain two-launch kernels
    (lora.mixed_supported)."""
    g = len(h_outs)
    n_all, h_in = x.shape
    dh = pool.shape[2]
    units_in, units_out = h_in // dh, sum(h_outs) // dh
    n_dec = offsets.shape[0] // g - 1
    k = token_index.shape[0]
    f32_dot = x.dtype == jnp.float32 or pool.dtype == jnp.float32
    pre = sgmv_launches(
        units_in, a_pre.shape, h_outs, dh, rank, prefill_tunables, seq_len, prefill_row_start, f32_dot
    )
    dec_shrink_grid, dec_shrink_kw = bgmv_shrink_launch(units_in, k, n_dec, decode_tunables, decode_row_start)
    dec_expand_grid, dec_expand_kw, _ = bgmv_expand_launch(
        h_outs, dh, k // g, n_dec, decode_tunables, max_rank, decode_row_start, interpret
    )
    params = pltriton.CompilerParams(
        num_warps=mixed_num_warps(prefill_tunables), num_stages=prefill_tunables.num_stages
    )
    layer_arr = jnp.reshape(layer, (1,)).astype(jnp.int32)
    s_pre, s_dec = pl.pallas_call(
        functools.partial(
            _mixed_shrink_kernel, pre_grid=pre.shrink_grid, pre_kw=pre.shrink_kw, dec_kw=dec_shrink_kw
        ),
        out_shape=(
            jax.ShapeDtypeStruct(pre.shrunk_shape, jnp.float32),
            jax.ShapeDtypeStruct((k,), jnp.float32),
        ),
        grid=(grid_programs(pre.shrink_grid) + grid_programs(dec_shrink_grid),),
        compiler_params=params,
        interpret=interpret,
        name="mixed_lora_shrink",
    )(layer_arr, token_index, a_dec, a_pre, x.reshape(n_all, units_in, dh), pool)
    out = pl.pallas_call(
        functools.partial(
            _mixed_expand_kernel,
            pre_grid=pre.expand_grid,
            pre_kw=pre.expand_kw,
            dec_grid=dec_expand_grid,
            dec_kw=dec_expand_kw,
        ),
        out_shape=jax.ShapeDtypeStruct((n_all, units_out, dh), y.dtype),
        grid=(grid_programs(pre.expand_grid) + grid_programs(dec_expand_grid),),
        input_output_aliases={7: 0},
        compiler_params=params,
        interpret=interpret,
        name="mixed_lora_expand_add",
    )(layer_arr, offsets, b_dec, s_dec, b_pre, s_pre, pool, y.reshape(n_all, units_out, dh))
    return out.reshape(n_all, units_out * dh)
