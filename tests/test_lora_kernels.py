"""Gathered LoRA kernels (BGMV decode, SGMV prefill) against their pure-jnp references.

On CPU the kernels run in the Pallas interpreter ("interpret"); on a GPU (marker `gpu`) compiled.
Fresh random inputs every case (never zeros), mixed ranks, padding pairs, float32 and bfloat16.
The interpreter starts every output as NaN (poisoned), so an element a kernel fails to write fails the
finiteness and closeness checks.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora import (
    LoraTunables,
    decode_offsets,
    lora_decode,
    lora_decode_expand_group,
    lora_decode_group,
    lora_decode_group_add,
    lora_decode_shrink,
    lora_prefill,
    lora_prefill_group,
    prefill_group_width,
)
from pallas_kernels.lora.grouped_kernel import adapter_groups
from pallas_kernels.lora.mosaic_kernel import interpret_params
from pallas_kernels.lora.shapes import expand_num_warps

# shrink and expand in one launch (bgmv_fused) at any batch size, at two chunk and block sizes
FUSED = [
    LoraTunables(fused_max_tokens=1 << 30, fused_chunk_units=2, fused_out_units=1),
    LoraTunables(fused_max_tokens=1 << 30, fused_chunk_units=8, fused_out_units=4, fused_num_warps=2),
]

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the largest |delta|


def _pool(rng, layers, units, dh, dtype):
    pool = rng.standard_normal((layers, units, dh)).astype(np.float32)
    pool[:, :8] = 0.0  # the zero page that padding pairs read
    return jnp.asarray(pool, dtype)


def _decode_case(rng, n_tokens, ranks, h_in, h_out, dh, dtype, pad_to):
    units_in, units_out = h_in // dh, h_out // dh
    units = 8 + sum(ranks) * (units_in + units_out) + 8
    pool = _pool(rng, 2, units, dh, dtype)
    tok, a, b = [], [], []
    next_unit = 8
    for n in range(n_tokens):
        for _ in range(ranks[n]):
            tok.append(n)
            a.append(next_unit)
            b.append(next_unit + units_in)
            next_unit += units_in + units_out
    pad = pad_to - len(tok)
    assert pad >= 0
    arr = lambda v, fill: jnp.asarray(v + [fill] * pad, jnp.int32)  # noqa: E731
    x = jnp.asarray(rng.standard_normal((n_tokens, h_in)), dtype)
    return x, pool, arr(tok, n_tokens), arr(a, 0), arr(b, 0)


def _grouped_case(n_tokens, ranks, h_in, widths):
    """Projections of the given output widths over the same tokens and x, in one pool: each one's
    (token_index, a_start, b_start) with its rows shifted to where its part of the pool starts."""
    cases = [
        _decode_case(
            np.random.default_rng(i), n_tokens, ranks, h_in, w, 16, jnp.float32, pad_to=sum(ranks) + 2
        )
        for i, w in enumerate(widths)
    ]
    pools, shift, tok, a_all, b_all = [], 0, [], [], []
    for _, pool_i, tok_i, a_i, b_i in cases:
        pools.append(pool_i)
        tok.append(tok_i)
        a_all.append(jnp.where(a_i > 0, a_i + shift, 0))
        b_all.append(jnp.where(a_i > 0, b_i + shift, 0))
        shift += pool_i.shape[1]
    return cases[0][0], jnp.concatenate(pools, axis=1), tok, a_all, b_all


def _check_side_by_side(got, x, pool, layer, tok, a_all, b_all, widths):
    """got holds the projections' deltas side by side; each equals lora_decode's reference alone."""
    col = 0
    for t_i, a_i, b_i, w in zip(tok, a_all, b_all, widths):
        want = lora_decode(x, pool, layer, t_i, a_i, b_i, w, implementation="reference")
        _check(got[:, col : col + w], want, jnp.float32)
        col += w


def _check(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    scale = max(np.abs(want).max(), 1e-6)
    assert np.abs(got - want).max() / scale < TOL[dtype], np.abs(got - want).max() / scale


def _impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "interpret"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "n_tokens,rank_choices,h_in,h_out,dh",
    [
        (1, (1,), 64, 64, 16),
        (7, (0, 1, 3, 8), 64, 32, 16),  # mixed ranks, a token with no adapter
        (12, (2, 16, 5), 96, 48, 16),  # widths not a power of two in units
        (4, (32, 64), 128, 64, 32),
    ],
)
def test_bgmv_matches_reference(n_tokens, rank_choices, h_in, h_out, dh, dtype):
    rng = np.random.default_rng(n_tokens * 1000 + h_in)
    ranks = [int(rng.choice(rank_choices)) for _ in range(n_tokens)]
    x, pool, tok, a, b = _decode_case(rng, n_tokens, ranks, h_in, h_out, dh, dtype, pad_to=sum(ranks) + 5)
    layer = jnp.int32(1)
    want = lora_decode(x, pool, layer, tok, a, b, h_out, implementation="reference")
    got = lora_decode(x, pool, layer, tok, a, b, h_out, implementation=_impl())
    _check(got, want, dtype)
    # offsets given up front give the same result
    got2 = lora_decode(
        x,
        pool,
        layer,
        tok,
        a,
        b,
        h_out,
        decode_offsets(tok, n_tokens),
        implementation=_impl(),
        max_rank=max(rank_choices),
    )  # one gathered load per token
    _check(got2, want, dtype)


# several pairs per shrink program (their loads unrolled), its own warps, short or whole-row loads
MULTI_PAIR = [
    LoraTunables(shrink_pairs=4, shrink_num_warps=1, chunk_units=2),
    LoraTunables(shrink_pairs=2, shrink_num_warps=2, chunk_units=32, out_units=1, num_warps=1),
]


@pytest.mark.parametrize("tunables", MULTI_PAIR)
def test_bgmv_shrink_pairs_per_program(tunables):
    rng = np.random.default_rng(7)
    n_tokens = 9
    ranks = [int(rng.choice((0, 1, 4, 8))) for _ in range(n_tokens)]
    pad_to = -(-(sum(ranks) + 3) // 4) * 4  # padding pairs, and a pair count the programs divide
    x, pool, tok, a, b = _decode_case(rng, n_tokens, ranks, 64, 48, 16, jnp.float32, pad_to=pad_to)
    layer = jnp.int32(1)
    want = lora_decode(x, pool, layer, tok, a, b, 48, implementation="reference")
    got = lora_decode(x, pool, layer, tok, a, b, 48, implementation=_impl(), tunables=tunables)
    _check(got, want, jnp.float32)


MOSAIC = [
    LoraTunables(expand_backend="mosaic", out_units=1),
    LoraTunables(expand_backend="mosaic", out_units=2),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tunables", MOSAIC)
def test_mosaic_expand_matches_reference(tunables, dtype):
    """The Mosaic GPU expand (Mosaic GPU's own interpreter on CPU: simulated TMA copies and barriers)
    on q/k/v-style projections of unequal widths, ranks above max_rank (several loads reusing the
    barriers), tokens without an adapter and padding pairs."""
    if _impl() == "interpret" and interpret_params() is None:
        pytest.skip("this JAX has no Mosaic GPU interpreter")
    rng = np.random.default_rng(11)
    n_tokens, h_in, widths = 6, 256, (256, 128, 128)  # blocks of 128 elements: 2 units of Dh 64
    ranks = [int(rng.choice((0, 2, 5, 8))) for _ in range(n_tokens)]
    x, pool, tok, a, b = _decode_case(rng, n_tokens, ranks, h_in, h_in, 64, dtype, pad_to=sum(ranks) + 3)
    layer = jnp.int32(1)
    shrunk = lora_decode_shrink(x, pool, layer, jnp.concatenate([tok] * 3), jnp.concatenate([a] * 3))
    offsets = decode_offsets(tok, n_tokens)
    args = (shrunk, pool, layer, jnp.concatenate([tok] * 3), jnp.concatenate([b] * 3))
    args += (jnp.concatenate([offsets] * 3), widths, x.dtype)
    want = lora_decode_expand_group(*args, implementation="reference")
    got = lora_decode_expand_group(*args, implementation=_impl(), tunables=tunables, max_rank=4)
    _check(got, want, dtype)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_shrink_then_expand_equals_per_projection(dtype, impl):
    """q/k/v-style grouping: three projections' pairs in one shrink launch, each expanded alone from
    its slice of the shrunk values, and all three in one expand launch, equal lora_decode run per
    projection."""
    impl = _impl() if impl == "kernel" else "reference"
    rng = np.random.default_rng(5)
    n_tokens, h = 9, 64
    ranks = [int(rng.choice((0, 2, 8))) for _ in range(n_tokens)]
    x, pool, tok, a, b = _decode_case(rng, n_tokens, ranks, h, h, 16, dtype, pad_to=sum(ranks) + 3)
    layer = jnp.int32(1)
    members = [(a, b), (b, a), (a, a)]  # three projections over the same tokens, other rows each
    shrunk = lora_decode_shrink(
        x,
        pool,
        layer,
        jnp.concatenate([tok] * 3),
        jnp.concatenate([m[0] for m in members]),
        implementation=impl,
    )
    offsets = decode_offsets(tok, n_tokens)
    k = tok.shape[0]
    for i, (a_i, b_i) in enumerate(members):
        want = lora_decode(x, pool, layer, tok, a_i, b_i, h, implementation="reference")
        got = lora_decode_expand_group(
            shrunk[i * k : (i + 1) * k],
            pool,
            layer,
            tok,
            b_i,
            offsets,
            (h,),
            x.dtype,
            implementation=impl,
            max_rank=8,
        )
        _check(got, want, dtype)
    # and all three expands in one launch: the deltas side by side
    both = lora_decode_expand_group(
        shrunk,
        pool,
        layer,
        jnp.concatenate([tok] * 3),
        jnp.concatenate([m[1] for m in members]),
        jnp.concatenate([offsets] * 3),
        (h, h, h),
        x.dtype,
        implementation=impl,
        max_rank=8,
    )
    for i, (a_i, b_i) in enumerate(members):
        _check(
            both[:, i * h : (i + 1) * h],
            lora_decode(x, pool, layer, tok, a_i, b_i, h, implementation="reference"),
            dtype,
        )


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_grouped_expand_with_unequal_widths(impl):
    """q/k/v of a GQA model: k and v narrower than q."""
    impl = _impl() if impl == "kernel" else "reference"
    rng = np.random.default_rng(9)
    n_tokens, h_in, widths = 6, 64, (64, 32, 32)
    ranks = [int(rng.choice((1, 4, 16))) for _ in range(n_tokens)]
    layer = jnp.int32(1)
    x, pool, tok, a_all, b_all = _grouped_case(n_tokens, ranks, h_in, widths)
    tok_all = jnp.concatenate(tok)
    shrunk = lora_decode_shrink(x, pool, layer, tok_all, jnp.concatenate(a_all), implementation=impl)
    offsets = jnp.concatenate([decode_offsets(t, n_tokens) for t in tok])
    got = lora_decode_expand_group(
        shrunk,
        pool,
        layer,
        tok_all,
        jnp.concatenate(b_all),
        offsets,
        widths,
        jnp.float32,
        implementation=impl,
        max_rank=16,
    )
    _check_side_by_side(got, x, pool, layer, tok, a_all, b_all, widths)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch,t,r,used", [(2, 16, 16, (16, 3)), (3, 32, 32, (1, 32, 0)), (1, 64, 16, (9,))])
def test_sgmv_matches_reference(batch, t, r, used, dtype):
    rng = np.random.default_rng(batch * 100 + t + r)
    h_in, h_out, dh = 64, 96, 16
    units_in, units_out = h_in // dh, h_out // dh
    pool = _pool(rng, 3, 8 + batch * r * (units_in + units_out), dh, dtype)
    a = np.zeros((batch, r), np.int32)
    b = np.zeros((batch, r), np.int32)
    unit = 8
    for i in range(batch):
        for j in range(used[i]):  # the sequence's adapter rank; the rest of R is padding
            a[i, j], b[i, j] = unit, unit + units_in
            unit += units_in + units_out
    x = jnp.asarray(rng.standard_normal((batch, t, h_in)), dtype)
    layer = jnp.int32(2)
    want = lora_prefill(x, pool, layer, jnp.asarray(a), jnp.asarray(b), h_out, implementation="reference")
    got = lora_prefill(x, pool, layer, jnp.asarray(a), jnp.asarray(b), h_out, implementation=_impl())
    _check(got, want, dtype)


@pytest.mark.parametrize(
    "split_columns,max_splits,splits", [(512, 0, 4), (32, 0, 2), (16, 0, 1), (512, 2, 2), (512, 1, 1)]
)
def test_sgmv_split_cap_keeps_results(split_columns, max_splits, splits):
    """A rank-16 chunk over 4 input units with the split partials capped at 512 / 32 / 16 columns (4
    splits of 1 unit, 2 of 2, 1 of 4: the shrink's partials have that many splits), or at 2 / 1 splits
    (sgmv_max_splits), gives the reference's deltas."""
    tunables = LoraTunables(sgmv_split_columns=split_columns, sgmv_max_splits=max_splits)
    rng = np.random.default_rng(7)
    h_in, h_out, dh, r, t = 64, 96, 16, 16, 32
    units_in, units_out = h_in // dh, h_out // dh
    pool = _pool(rng, 2, 8 + r * (units_in + units_out), dh, jnp.float32)
    a, b = np.zeros((1, r), np.int32), np.zeros((1, r), np.int32)
    for j in range(11):
        a[0, j], b[0, j] = 8 + j * (units_in + units_out), 8 + j * (units_in + units_out) + units_in
    x = jnp.asarray(rng.standard_normal((1, t, h_in)), jnp.float32)
    args = (x, pool, jnp.int32(1), jnp.asarray(a), jnp.asarray(b), h_out)
    want = lora_prefill(*args, implementation="reference")
    got = lora_prefill(*args, implementation=_impl(), tunables=tunables)
    _check(got, want, jnp.float32)
    traced = str(jax.make_jaxpr(lambda: lora_prefill(*args, implementation=_impl(), tunables=tunables))())
    assert f"f32[1,{t},{splits},{r}]" in traced  # the shrink's partials: [B, T, splits, R]


@pytest.mark.parametrize("columns,grid", [(0, (1, 4, 8, 1)), (64, (1, 4, 8, 4)), (16, (1, 4, 2, 16))])
def test_sgmv_shrink_columns_keep_results(columns, grid):
    """A rank-64 q/k/v chunk of 128 tokens (256 shrunk columns, 16 input units): with the columns in
    blocks of 64 the shrink runs 4x the programs at the same 8 splits; in blocks of 16 the program target
    leaves 2 splits. The deltas are the reference's either way."""
    tunables = LoraTunables(sgmv_shrink_columns=columns)
    rng = np.random.default_rng(64)
    h_in, dh, r, t, widths = 256, 16, 64, 128, (64, 32, 32)
    units_in, width = h_in // dh, prefill_group_width(3, r)
    pool = _pool(rng, 2, 8 + 3 * r * (units_in + 4), dh, jnp.float32)
    a, b = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    unit = 8
    for m, h_out in enumerate(widths):
        for j in range((40, 64, 17)[m]):  # the members' ranks
            a[0, m * r + j], b[0, m * r + j] = unit, unit + units_in
            unit += units_in + h_out // dh
    x = jnp.asarray(rng.standard_normal((1, t, h_in)), jnp.float32)
    args = (x, pool, jnp.int32(1), jnp.asarray(a), jnp.asarray(b), widths, r)
    traced = str(
        jax.make_jaxpr(lambda: lora_prefill_group(*args, implementation=_impl(), tunables=tunables))()
    )
    assert f"grid={grid}" in traced
    got = lora_prefill_group(*args, implementation=_impl(), tunables=tunables)
    want = jnp.concatenate(
        [
            lora_prefill(x, pool, jnp.int32(1), args[3][:, m * r : (m + 1) * r], args[4][:, m * r : (m + 1) * r],
                         h_out, implementation="reference")
            for m, h_out in enumerate(widths)
        ],
        axis=-1,
    )  # fmt: skip
    _check(got, want, jnp.float32)


def test_lora_tunables_reject_bad_columns_and_lanes():
    for bad in (dict(sgmv_shrink_columns=8), dict(sgmv_shrink_columns=48), dict(expand_lanes=12)):
        with pytest.raises(ValueError, match="power of two"):
            LoraTunables(**bad)
    LoraTunables(sgmv_shrink_columns=16, expand_lanes=1)  # the smallest accepted


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "batch,t,r,widths,used",
    [
        (2, 16, 16, (96, 32, 32), ((16, 3), (5, 0), (16, 16))),  # q/k/v of GQA, mixed use
        (1, 32, 32, (64, 64), ((7,), (32,))),  # gate/up
    ],
)
@pytest.mark.parametrize("columns", [0, 16])
def test_sgmv_group_matches_members(batch, t, r, widths, used, dtype, columns):
    """One grouped SGMV (shared shrink and expand launches) equals each member's own SGMV side by
    side; the group's columns past G * rank are padding. columns: shrunk columns a shrink program
    (LoraTunables.sgmv_shrink_columns; 0: all of them)."""
    tunables = LoraTunables(sgmv_shrink_columns=columns)
    rng = np.random.default_rng(batch * 10 + t + r)
    h_in, dh, g = 64, 16, len(widths)
    units_in = h_in // dh
    pool = _pool(rng, 3, 8 + g * batch * r * (units_in + max(widths) // dh), dh, dtype)
    width = prefill_group_width(g, r)
    a, b = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
    unit = 8
    for m, h_out in enumerate(widths):
        for i in range(batch):
            for j in range(used[m][i]):
                a[i, m * r + j], b[i, m * r + j] = unit, unit + units_in
                unit += units_in + h_out // dh
    x = jnp.asarray(rng.standard_normal((batch, t, h_in)), dtype)
    layer = jnp.int32(1)
    got = lora_prefill_group(
        x, pool, layer, jnp.asarray(a), jnp.asarray(b), widths, r, implementation=_impl(), tunables=tunables
    )
    want = jnp.concatenate(
        [
            lora_prefill(
                x,
                pool,
                layer,
                jnp.asarray(a[:, m * r : (m + 1) * r]),
                jnp.asarray(b[:, m * r : (m + 1) * r]),
                h_out,
                implementation="reference",
            )
            for m, h_out in enumerate(widths)
        ],
        axis=-1,
    )
    assert got.shape == (batch, t, sum(widths))
    _check(got, want, dtype)


def test_sgmv_group_rejects_bad_width():
    x = jnp.zeros((1, 16, 64))
    pool = jnp.zeros((2, 64, 16))
    bad = jnp.zeros((1, 48), jnp.int32)  # 3 x 16, not padded to 64
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        lora_prefill_group(x, pool, jnp.int32(0), bad, bad, (32, 32, 32), 16)


@pytest.mark.parametrize("tunables", FUSED)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "n_tokens,rank_choices,h_in,h_out,dh,max_rank",
    [
        (1, (1,), 64, 64, 16, 16),
        (7, (0, 1, 3, 8), 64, 32, 16, 8),  # mixed ranks, a token with no adapter
        (12, (2, 16, 5), 96, 48, 16, 4),  # ranks above max_rank: several loads per token
        (4, (32, 64), 128, 64, 32, 64),
    ],
)
def test_fused_shrink_expand_matches_reference(
    n_tokens, rank_choices, h_in, h_out, dh, max_rank, dtype, tunables
):
    rng = np.random.default_rng(n_tokens * 7 + h_out)
    ranks = [int(rng.choice(rank_choices)) for _ in range(n_tokens)]
    x, pool, tok, a, b = _decode_case(rng, n_tokens, ranks, h_in, h_out, dh, dtype, pad_to=sum(ranks) + 5)
    layer = jnp.int32(1)
    want = lora_decode(x, pool, layer, tok, a, b, h_out, implementation="reference")
    got = lora_decode(
        x, pool, layer, tok, a, b, h_out, implementation=_impl(), tunables=tunables, max_rank=max_rank
    )
    _check(got, want, dtype)


@pytest.mark.parametrize("tunables", [None, *FUSED])
def test_decode_group_with_unequal_widths(tunables):
    """lora_decode_group (one fused launch, or a shared shrink and expand) for q/k/v of a GQA model
    equals lora_decode per projection."""
    rng = np.random.default_rng(11)
    n_tokens, h_in, widths = 7, 64, (64, 32, 32)
    ranks = [int(rng.choice((0, 1, 4, 16))) for _ in range(n_tokens)]
    layer = jnp.int32(0)
    x, pool, tok, a_all, b_all = _grouped_case(n_tokens, ranks, h_in, widths)
    got = lora_decode_group(
        x,
        pool,
        layer,
        jnp.concatenate(tok),
        jnp.concatenate(a_all),
        jnp.concatenate(b_all),
        jnp.concatenate([decode_offsets(t, n_tokens) for t in tok]),
        widths,
        implementation=_impl(),
        tunables=tunables,
        max_rank=16,
    )
    _check_side_by_side(got, x, pool, layer, tok, a_all, b_all, widths)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens", [1, 32, 256, 512])
def test_bgmv_gpu_sweep(n_tokens):
    rng = np.random.default_rng(n_tokens)
    ranks = [int(rng.choice((1, 8, 16, 64, 128))) for _ in range(n_tokens)]
    x, pool, tok, a, b = _decode_case(
        rng, n_tokens, ranks, 512, 256, 128, jnp.bfloat16, pad_to=sum(ranks) + 3
    )
    layer = jnp.int32(0)
    want = lora_decode(x, pool, layer, tok, a, b, 256, implementation="reference")
    got = lora_decode(x, pool, layer, tok, a, b, 256, implementation="pallas")
    _check(got, want, jnp.bfloat16)
    for tunables in FUSED + MULTI_PAIR + MOSAIC:
        other = lora_decode(x, pool, layer, tok, a, b, 256, implementation="pallas", tunables=tunables)
        _check(other, want, jnp.bfloat16)


def test_bad_shapes_raise_early():
    x = jnp.ones((4, 64), jnp.float32)
    pool = jnp.ones((1, 32, 16), jnp.float32)
    idx = jnp.zeros((8,), jnp.int32)
    with pytest.raises(ValueError, match="multiples"):
        lora_decode(x, pool, jnp.int32(0), idx, idx, idx, 40)
    with pytest.raises(ValueError, match="equal 1-D"):
        lora_decode(x, pool, jnp.int32(0), idx, idx[:4], idx, 32)
    with pytest.raises(ValueError, match="offsets"):
        lora_decode(x, pool, jnp.int32(0), idx, idx, idx, 32, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="unknown implementation"):
        lora_decode(x, pool, jnp.int32(0), idx, idx, idx, 32, implementation="fast")


def test_tuned_shapes_come_in_tiers_by_batch(monkeypatch):
    from pallas_kernels.lora import shapes

    small, large = LoraTunables(chunk_units=8, shrink_num_warps=4), LoraTunables(chunk_units=4, num_warps=1)
    monkeypatch.setitem(shapes.TUNED, 48, ((64, small), (1 << 30, large)))
    assert shapes.tunables_for(48, 1) == small and shapes.tunables_for(48, 64) == small
    assert shapes.tunables_for(48, 65) == large and shapes.tunables_for(48) == large
    assert shapes.tunables_for(40, 32) == LoraTunables()  # no tuned tiers for this head_dim


# ------------------------------------------------------------------------------------------------
# BGMV where a step's tokens share adapters (slora-trace at n = 5): mixed ranks, whole groups


SHARED = [
    LoraTunables(),
    LoraTunables(out_units=2, num_warps=2),
    LoraTunables(expand_lanes=4),  # several loads for every token above rank 4
]


def _shared_case(rng, adapter_of, adapter_ranks, h_in, widths, dh, pad):
    """Tokens sharing adapters as in a serving step: token n uses adapter adapter_of[n] (-1: none), of
    rank adapter_ranks[a], whose rows all its tokens' pairs point at. Each projection's pairs grouped
    by token, padded with pad pairs; the projections' rows in one pool."""
    units_in = h_in // dh
    # every member's rows of every adapter, then 8 spare units: no pair reads past the pool (the
    # GPU's loads are unchecked where interpret mode's and the reference's gathers clamp)
    n_units = 8 + sum(adapter_ranks) * sum(units_in + w // dh for w in widths) + 8
    pool = _pool(rng, 2, n_units, dh, jnp.float32)
    unit, tok, a_all, b_all = 8, [], [], []
    for w in widths:
        rows = []
        for r in adapter_ranks:
            rows.append(
                [
                    (unit + j * (units_in + w // dh), unit + j * (units_in + w // dh) + units_in)
                    for j in range(r)
                ]
            )
            unit += r * (units_in + w // dh)
        t_m, a_m, b_m = [], [], []
        for n, ad in enumerate(adapter_of):
            for a, b in rows[ad] if ad >= 0 else []:
                t_m.append(n), a_m.append(a), b_m.append(b)
        k = sum(adapter_ranks[ad] for ad in adapter_of if ad >= 0) + pad
        fill = k - len(t_m)
        tok.append(jnp.asarray(t_m + [len(adapter_of)] * fill, jnp.int32))
        a_all.append(jnp.asarray(a_m + [0] * fill, jnp.int32))
        b_all.append(jnp.asarray(b_m + [0] * fill, jnp.int32))
    assert unit + 8 == n_units, (unit, n_units)
    x = jnp.asarray(rng.standard_normal((len(adapter_of), h_in)), jnp.float32)
    return x, pool, tok, a_all, b_all


def test_expand_lanes_set_the_load_width():
    """expand_lanes 4 in a rank-16 bucket: the expand loads [4, Dh] tiles of B rows (in several loads a
    token), where by default it loads [16, Dh]; the deltas are the reference's either way (SHARED)."""
    rng = np.random.default_rng(0)
    widths = (64, 32, 32)
    x, pool, tok, a_all, b_all = _shared_case(rng, (0, 1, 0), (16, 4), 64, widths, 16, pad=3)
    pairs = _group_pairs(tok, a_all, b_all, 3)

    def traced(lanes: int) -> str:
        tunables = LoraTunables(expand_lanes=lanes)
        return str(
            jax.make_jaxpr(
                lambda: lora_decode_group(
                    x,
                    pool,
                    jnp.int32(1),
                    *pairs,
                    widths,
                    implementation="interpret",
                    tunables=tunables,
                    max_rank=16,
                )
            )()
        )

    assert "f32[16,16]" in traced(0) and "i32[16]" in traced(0)
    assert "f32[16,16]" not in traced(4) and "i32[16]" not in traced(4)


@pytest.mark.parametrize("max_rank,expand_warps", [(16, 1), (32, 2), (64, 2)])
def test_wide_loads_take_wide_num_warps(max_rank, expand_warps):
    """wide_num_warps: the BGMV expand runs 2 warps where its loads are at least wide_lanes (32) pairs
    wide, num_warps (1) below; the shrink keeps its own warps (4) either way."""
    rng = np.random.default_rng(0)
    widths = (64, 32, 32)
    x, pool, tok, a_all, b_all = _shared_case(rng, (0, 1, 0), (16, 4), 64, widths, 16, pad=3)
    pairs = _group_pairs(tok, a_all, b_all, 3)
    tunables = LoraTunables(num_warps=1, wide_num_warps=2, shrink_num_warps=4)
    assert [expand_num_warps(tunables, lanes) for lanes in (16, 32, 64)] == [1, 2, 2]
    traced = str(
        jax.make_jaxpr(
            lambda: lora_decode_group(
                x, pool, jnp.int32(1), *pairs, widths, implementation="interpret", tunables=tunables,
                max_rank=max_rank,
            )
        )()
    )  # fmt: skip
    assert re.findall(r"num_warps=(\d+)", traced) == ["4", str(expand_warps)]
    assert expand_num_warps(LoraTunables(num_warps=1), 64) == 1  # 0: num_warps everywhere
    with pytest.raises(ValueError, match="wide_num_warps"):
        LoraTunables(wide_num_warps=3)


def _added_in_place(rng, x, pool, layer, pairs, widths, tunables, max_rank):
    """The group's deltas added into the rows of a random y at row 2 on (x's rows there too): (y, the
    result), the rows around them checked untouched."""
    n = x.shape[0]
    y = jnp.asarray(rng.standard_normal((n + 3, sum(widths))), jnp.float32)
    x_all = jnp.concatenate([jnp.zeros((2, x.shape[1]), x.dtype), x, jnp.zeros((1, x.shape[1]), x.dtype)])
    added = lora_decode_group_add(
        y, x_all, pool, layer, *pairs, widths, row_start=2, implementation=_impl(), tunables=tunables,
        max_rank=max_rank,
    )  # fmt: skip
    np.testing.assert_array_equal(added[:2], y[:2])
    np.testing.assert_array_equal(added[-1], y[-1])
    return y, added


def _group_pairs(tok, a_all, b_all, n):
    """The members' pairs as one group's arrays: token_index, a_start, b_start [G*K], offsets [G*(N+1)]."""
    offsets = [decode_offsets(t, n) for t in tok]
    return jnp.concatenate(tok), jnp.concatenate(a_all), jnp.concatenate(b_all), jnp.concatenate(offsets)


@pytest.mark.parametrize("tunables", SHARED)
@pytest.mark.parametrize(
    "adapter_of,adapter_ranks,max_rank",
    [
        ((0, 1, 0, 2, -1, 1, 0, 0), (3, 16, 1), 16),  # shared adapters, one token without
        ((1, 1, 1, 1), (4, 8), 8),  # one adapter for the whole batch
        ((0,) * 11 + (1, 0, 0, 0, 0, 0, 0), (5, 2), 8),  # a group of 17
        ((0, 1, 2, 0, 1, 2), (16, 2, 9), 4),  # ranks above max_rank: several loads a token
        ((-1, -1, -1), (4,), 16),  # no adapter in the batch: zeros
    ],
)
def test_shared_adapters_decode_matches_reference(tunables, adapter_of, adapter_ranks, max_rank):
    rng = np.random.default_rng(len(adapter_of))
    widths, n = (64, 32, 32), len(adapter_of)
    x, pool, tok, a_all, b_all = _shared_case(rng, adapter_of, adapter_ranks, 64, widths, 16, pad=3)
    layer = jnp.int32(1)
    pairs = _group_pairs(tok, a_all, b_all, n)
    got = lora_decode_group(
        x, pool, layer, *pairs, widths, implementation=_impl(), tunables=tunables, max_rank=max_rank
    )
    _check_side_by_side(got, x, pool, layer, tok, a_all, b_all, widths)
    y, added = _added_in_place(rng, x, pool, layer, pairs, widths, tunables, max_rank)
    _check_side_by_side(added[2:-1] - y[2:-1], x, pool, layer, tok, a_all, b_all, widths)


# ------------------------------------------------------------------------------------------------
# decode by adapter (LoraTunables.by_adapter_min_rank, grouped_kernel): groups of tokens run as SGMV


def test_adapter_groups_tables():
    """Tokens sorted by adapter into sequences of at most block_tokens rows (spare lanes repeat the
    first row; unused sequences -1), each with its leader's rank rows per member (0 past its rank)."""
    # 2 members, rank bucket 4; token 0: adapter X (rank 2), 1: none, 2: Y (rank 3; member 1: none),
    # 3: X, 4: X. A rows: X at 10, 11 / 20, 21; Y at 30, 31, 32. Pairs grouped by token, K = 8.
    a = [10, 11, 30, 31, 32, 10, 11, 10]
    # member 0: token 0 -> [0, 2), 1 -> none, 2 -> [2, 5), 3 -> [5, 7), 4 -> [7, 8) (its first row only)
    off0 = [0, 2, 2, 5, 7, 8]
    a1 = [20, 21, 20, 21, 20, 21, 0, 0]
    off1 = [0, 2, 2, 2, 4, 6]
    a_start = jnp.asarray(a + a1, jnp.int32)
    b_start = a_start + 100
    offsets = jnp.asarray(off0 + off1, jnp.int32)
    rows, a_rows, b_rows = adapter_groups(a_start, b_start, offsets, g=2, rank=4, block_tokens=2, row_start=3)
    # sorted keys: token 1 (-1); X tokens 0, 3, 4 (key 20: the max of members' first rows); Y token 2
    # (key 30). Sequences: X [0, 3], X [4, spare], Y [2, spare]; the rest unused
    np.testing.assert_array_equal(rows, [[3, 6], [7, 7], [5, 5], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(
        a_rows,
        [
            [10, 11, 0, 0, 20, 21, 0, 0],  # leader token 0
            [10, 0, 0, 0, 20, 21, 0, 0],  # leader token 4: one pair in member 0
            [30, 31, 32, 0, 0, 0, 0, 0],  # leader token 2: none in member 1
            [0] * 8,
            [0] * 8,
        ],
    )
    np.testing.assert_array_equal(b_rows, np.where(np.asarray(a_rows) > 0, np.asarray(a_rows) + 100, 0))


BY_ADAPTER = [
    LoraTunables(by_adapter_min_rank=16),
    LoraTunables(by_adapter_min_rank=16, sgmv_shrink_columns=16, sgmv_split_columns=16, sgmv_out_units=1),
]


@pytest.mark.parametrize("tunables", BY_ADAPTER)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "adapter_of,adapter_ranks,rank",
    [
        ((0, 1, 0, 2, -1, 1, 0, 0), (3, 16, 1), 16),  # shared adapters, one token without
        ((0,) * 11 + (1, 0, 0, 0, 0, 0, 0), (5, 2), 16),  # a group of 17: two sequences
        ((0, 1, 2, 3, 4, 0), (64, 33, 16, 1, 8), 64),  # rank bucket 64, one token each but one
        ((-1, -1, -1), (4,), 16),  # no adapter in the batch: zeros
    ],
)
def test_by_adapter_decode_matches_reference(tunables, dtype, adapter_of, adapter_ranks, rank):
    """Decode by adapter equals the reference, both as deltas and added into y's rows in place (the
    rows around them, and those of tokens without an adapter, untouched)."""
    rng = np.random.default_rng(len(adapter_of) + rank)
    widths, n = (64, 32, 32), len(adapter_of)
    x, pool, tok, a_all, b_all = _shared_case(rng, adapter_of, adapter_ranks, 64, widths, 16, pad=3)
    x, pool = x.astype(dtype), pool.astype(dtype)
    layer = jnp.int32(1)
    pairs = _group_pairs(tok, a_all, b_all, n)
    got = lora_decode_group(
        x, pool, layer, *pairs, widths, implementation=_impl(), tunables=tunables, max_rank=rank
    )
    assert got.dtype == dtype
    col = 0
    for t_i, a_i, b_i, w in zip(tok, a_all, b_all, widths):
        want = lora_decode(x, pool, layer, t_i, a_i, b_i, w, implementation="reference")
        _check(got[:, col : col + w], want, dtype)
        col += w
    y, added = _added_in_place(rng, x, pool, layer, pairs, widths, tunables, rank)
    without = [i for i, ad in enumerate(adapter_of) if ad < 0]
    np.testing.assert_array_equal(added[2:-1][np.asarray(without, int)], y[2:-1][np.asarray(without, int)])
    _check(added[2:-1] - y[2:-1], got.astype(jnp.float32), dtype)


@pytest.mark.parametrize(
    "min_rank,bucket,by_adapter",
    [(0, 16, False), (16, 16, True), (64, 16, False), (64, 64, True), (16, 8, False)],
)
def test_by_adapter_replaces_bgmv_launches_from_its_rank(min_rank, bucket, by_adapter):
    """Rank buckets of at least by_adapter_min_rank (0: none) run by adapter: its two launches in place of
    BGMV's shrink and expand; a bucket under 16 (no tensor-core tile) stays BGMV."""
    rng = np.random.default_rng(3)
    widths, adapter_of = (64, 32, 32), (0, 1, 0, 0)
    x, pool, tok, a_all, b_all = _shared_case(rng, adapter_of, (8, 4), 64, widths, 16, pad=3)
    pairs = _group_pairs(tok, a_all, b_all, 4)
    tunables = LoraTunables(by_adapter_min_rank=min_rank)
    call = functools.partial(lora_decode_group, implementation=_impl(), tunables=tunables, max_rank=bucket)
    traced = str(jax.make_jaxpr(lambda: call(x, pool, jnp.int32(1), *pairs, widths))())
    assert ("bgmv_by_adapter_shrink" in traced) == by_adapter
    assert ("bgmv_by_adapter_expand_add" in traced) == by_adapter
    assert ("name=bgmv_shrink" in traced) != by_adapter and ("name=bgmv_expand" in traced) != by_adapter
    got = call(x, pool, jnp.int32(1), *pairs, widths)
    _check_side_by_side(got, x, pool, jnp.int32(1), tok, a_all, b_all, widths)


def test_adapter_groups_computed_once_a_step():
    """Every layer's call builds the same tables from the step's metadata: XLA merges them into one
    sort and its two scatters (rows, and each sequence's first row) a step (checked here on the CPU's pipeline, whose CSE the GPU's shares)."""
    g, n, r = 3, 32, 64

    def step(a, b, off, per_layer):
        tables = jax.jit(lambda a, b, off: adapter_groups(a, b, off, g=g, rank=r, row_start=3))
        outs = []
        for i in range(4):  # four layers, each using the tables with its own data
            rows, a_rows, b_rows = tables(a, b, off)
            outs.append((rows.sum() + a_rows.sum() + b_rows.sum()) * per_layer[i])
        return jnp.stack(outs)

    pairs = jnp.zeros(g * n * r, jnp.int32)
    hlo = (
        jax.jit(step).lower(pairs, pairs, jnp.zeros(g * (n + 1), jnp.int32), jnp.ones(4)).compile().as_text()
    )
    assert hlo.count(" sort(") == 1 and hlo.count(" scatter(") == 2
