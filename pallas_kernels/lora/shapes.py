"""Launch shapes of the gathered LoRA kernels, shared by the Triton kernels (kernel.py) and the Mosaic GPU
expand (mosaic_kernel.py): the tunables, their tuned tables, and the grid arithmetic over output blocks."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LoraTunables:
    """Launch shapes. chunk_units: units of a row read per load (shrink); shrink_pairs: pairs per BGMV
    shrink program (their loads in flight together); shrink_num_warps: the shrink's warps (0: num_warps);
    out_units: output units per expand program, num_warps its warps; block_tokens: tokens per SGMV
    program, sgmv_out_units / sgmv_num_warps its expand's units per program and both its warps.
    expand_backend: "triton" (kernel.bgmv_expand) or "mosaic" (mosaic_kernel.bgmv_expand_mosaic, Hopper;
    out_units as for Triton, num_warps unused: one warpgroup per program). fused_max_tokens: decode batches of at
    most this many tokens run shrink and expand in one launch (bgmv_fused; 0: never), whose programs
    each write fused_out_units output units, read fused_chunk_units units of A rows per load and run
    fused_num_warps warps. sgmv_split_columns: the SGMV shrink's split-K partials times a member's rank
    columns at most - every SGMV expand program sums its token block's partials itself, so at rank 64 a
    128-token chunk's 32 splits read 256 KB a program (98 MB a layer from L2 for q/k/v: 25 us against 11
    at rank 16 on the H200); 512 gives rank 64 8 splits and leaves rank 16's 32. sgmv_max_splits: the
    SGMV shrink's split-K partials at most (0: as the program target and sgmv_split_columns give): a
    low-rank chunk's many splits cost the expand more than they save the shrink - a 192-token rank-16
    q/k/v + o chunk (H200, ncu, bench.kernels.sgmv_once) took 37.3 us a layer at 16 splits, 31.0 at 8,
    34.8 at 4, 49.0 at 2; rank 64's 8 splits (512 columns) are the same cap. sgmv_shrink_columns:
    shrunk columns per SGMV shrink program (0: all of the group's; else a power of two >= 16): at rank 64
    q/k/v's 256 columns in blocks of 64 run 4x the programs, and the splits are counted against the
    program target with them (a 128-token chunk: 32 programs -> 128, the same 8 splits). expand_lanes:
    pairs per load of the Triton BGMV expand (0: the rank bucket's; else a power of two): a smaller load
    serves a low-rank token in one load of its own width where a rank-64 bucket's tile is 64 lanes, and
    a high-rank token in several loads. by_adapter_min_rank: decode batches whose rank bucket is at
    least this (0: none) run by adapter (grouped_kernel.bgmv_by_adapter: the tokens grouped by adapter
    on the device, each group an SGMV sequence on tensor cores, with the sgmv_* launch shapes) instead
    of BGMV's per-token shrink and expand; 64 takes the steps with ranks above 16 (slora-trace at n = 5
    and 100) and leaves rank 8's (n >= 1,000) to BGMV; on the H200 it was slower at n = 5's shape (decode
    LoRA 1.05-1.11 ms a step against BGMV's 0.67: mixed-step-args-*-20261204T103349/103645.json).
    wide_num_warps: the Triton BGMV expand's warps where a load is at least wide_lanes pairs wide (0:
    num_warps everywhere): a [64, Dh] tile of B rows is 256 values a thread on one warp; at slora-trace's
    n = 5 decode layer (bucket 64) 2 warps took 7.8 us against 9.1 on 1, where at bucket 8 1 warp is the
    faster (5.4 us against 6.3; kernels-lora-trace-20261204T104641/104724.json). mixed_launch (read from
    the prompt chunk's tier): a mixed step's decode rows and prompt chunk run their BGMV and SGMV in one
    shrink and one expand launch (mixed_kernel.py) where both would run the plain two-launch kernels;
    mixed_num_warps: both launches' warps (0: sgmv_num_warps). Off: not yet measured."""

    chunk_units: int = 8
    out_units: int = 4
    block_tokens: int = 32
    num_warps: int = 4
    num_stages: int = 2
    shrink_pairs: int = 1
    shrink_num_warps: int = 0
    sgmv_out_units: int = 4
    sgmv_num_warps: int = 4
    sgmv_split_columns: int = 512
    sgmv_shrink_columns: int = 0
    sgmv_max_splits: int = 0
    expand_lanes: int = 0
    by_adapter_min_rank: int = 0
    wide_num_warps: int = 0
    wide_lanes: int = 32
    expand_backend: str = "triton"
    fused_max_tokens: int = 0
    fused_out_units: int = 8
    fused_chunk_units: int = 8
    fused_num_warps: int = 4
    mixed_launch: bool = False
    mixed_num_warps: int = 0

    def __post_init__(self) -> None:
        for name in ("sgmv_shrink_columns", "expand_lanes", "wide_num_warps", "wide_lanes"):
            v = getattr(self, name)
            if v < 0 or v & (v - 1) or (name == "sgmv_shrink_columns" and 0 < v < 16):
                raise ValueError(f"LoraTunables.{name} = {v}: 0 or a power of two (>= 16 for SGMV columns)")


# Tuned on the H100 (bench/kernels/lora.py), keyed by head_dim: tiers of (up to this many tokens,
# shapes), smallest first, since small decode batches pay latency and large ones bandwidth; the default
# elsewhere.
TUNED: dict[int, tuple[tuple[int, LoraTunables], ...]] = {
    128: (
        # decode-7b's layer at 32 tokens (q/k/v group + o), kernels-lora-20261126T103241.json; the
        # expand on 2 warps from 32-pair loads (rank buckets 32 and 64): at slora-trace's n = 5 shape
        # on the H200 decode steps 5.705 -> 5.672 ms, chunk steps 8.222 -> 8.087 (2 warps at every
        # bucket: mixed-step-args-0-20261204T105013.json against -args-none-20261204T082000.json)
        (64, LoraTunables(chunk_units=8, shrink_num_warps=4, out_units=1, num_warps=1, wide_num_warps=2)),
        # T5's 256 tokens on 256 adapters, the same run; SGMV (prompt chunks) one output unit per
        # expand program: a 256-token chunk's expands 0.98 -> 0.72 ms a step (mixed-step-sgmv1-*.json)
        (
            1 << 30,
            LoraTunables(
                chunk_units=4,
                shrink_num_warps=1,
                out_units=1,
                num_warps=1,
                sgmv_out_units=1,
                sgmv_max_splits=8,
            ),
        ),
    )
}


def tunables_for(head_dim: int, n_tokens: int = 1 << 30) -> LoraTunables:
    """The tuned shapes for this head_dim and batch of tokens (its first tier that holds n_tokens)."""
    for max_tokens, tunables in TUNED.get(head_dim, ()):
        if n_tokens <= max_tokens:
            return tunables
    return LoraTunables()


def expand_num_warps(tunables: LoraTunables, lanes: int) -> int:
    """The Triton BGMV expand's warps for loads of this many pairs (wide_num_warps from wide_lanes on)."""
    if tunables.wide_num_warps and lanes >= tunables.wide_lanes:
        return tunables.wide_num_warps
    return tunables.num_warps


def shrink_column_block(width: int, tunables: LoraTunables) -> int:
    """Shrunk columns an SGMV-style shrink program computes, of a sequence's width (sgmv_shrink_columns;
    0: all of them)."""
    return min(width, tunables.sgmv_shrink_columns) if tunables.sgmv_shrink_columns else width


def split_cap(tunables: LoraTunables, rank: int) -> int:
    """The SGMV-style shrink's split-K partials at most for a member's rank (sgmv_split_columns over the
    rank, and sgmv_max_splits where set)."""
    cap = tunables.sgmv_split_columns // rank
    return min(cap, tunables.sgmv_max_splits) if tunables.sgmv_max_splits else cap


def largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def output_blocks(h_outs: tuple[int, ...], dh: int, cap: int):
    """Output units of each projection, units per program (a power of two dividing them all, <= cap),
    programs per projection and where each projection's programs start."""
    units = [h // dh for h in h_outs]
    out_units = largest_pow2_divisor(functools.reduce(math.gcd, units), cap)
    blocks = [u // out_units for u in units]
    return units, out_units, blocks, tuple(sum(blocks[:i]) for i in range(len(h_outs)))


def projection_of(j, block_starts):
    """(projection m, block index within it) of output block j; block_starts: where each projection's
    blocks start (static)."""
    m, first = 0, 0  # one projection: plain ints, nothing added to the index arithmetic
    for i, st in enumerate(block_starts[1:], 1):
        # int32 constants, not Python ints: Triton's select lowering gives a weak-typed literal
        # the predicate's type (i1), and `j - first` then fails to lower ('i32' vs 'i1').
        m = jnp.where(j >= st, jnp.int32(i), jnp.int32(m) if isinstance(m, int) else m)
        first = jnp.where(j >= st, jnp.int32(st), jnp.int32(first) if isinstance(first, int) else first)
    return m, j - first
