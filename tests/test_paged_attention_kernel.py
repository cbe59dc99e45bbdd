"""Paged decode attention kernel against the pure-jnp reference: GQA ratios, page sizes, ragged
lengths, sliding windows, float32 and bfloat16; interpret mode on CPU, compiled on a GPU.
The interpreter starts every output as NaN (poisoned), so an element a kernel fails to write fails the
finiteness and closeness checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import AttentionTunables, PrefillTunables, paged_attention, write_kv

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def _impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "interpret"


def _case(rng, b, hq, hkv, dh, page_size, max_pages, dtype, layers=2):
    n_pages = 1 + b * max_pages
    page_units = page_size * 2 * hkv
    pool = rng.standard_normal((layers, n_pages * page_units, dh)).astype(np.float32)
    pool[:, :page_units] = 0.0
    lens = rng.integers(0, max_pages * page_size, b)
    lens[0] = max_pages * page_size - 1  # one sequence fills its table
    perm = rng.permutation(np.arange(1, n_pages))  # pages scattered through the pool
    tables = np.zeros((b, max_pages), np.int32)
    for i in range(b):
        used = -(-int(lens[i]) // page_size)
        tables[i, :used] = perm[i * max_pages : i * max_pages + used]
    q = rng.standard_normal((b, 1, hq, dh))
    k = rng.standard_normal((b, 1, hkv, dh))
    v = rng.standard_normal((b, 1, hkv, dh))
    as_ = lambda a, dt=dtype: jnp.asarray(a, dt)  # noqa: E731
    return (
        as_(q),
        as_(k),
        as_(v),
        as_(pool),
        jnp.int32(layers - 1),
        jnp.asarray(tables),
        jnp.asarray(lens[:, None], jnp.int32),
        jnp.asarray(lens, jnp.int32),
        jnp.ones((b,), jnp.int32),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "b,hq,hkv,dh,page_size,max_pages,window",
    [
        (3, 4, 4, 16, 4, 6, None),  # MHA
        (4, 6, 2, 32, 8, 4, None),  # GQA 3
        (2, 8, 1, 16, 16, 3, None),  # MQA
        (3, 4, 2, 16, 4, 8, 9),  # sliding window
    ],
)
@pytest.mark.parametrize("mma", [True, False, "split", "items"])
def test_decode_kernel_matches_reference(b, hq, hkv, dh, page_size, max_pages, window, dtype, mma):
    """mma: tensor-core tiles per KV group (the default); else the vector loop per query head; split:
    the tensor-core tiles over splits of at most two pages each, merged after (flash-decoding); items:
    the same splits walked as a work list of each sequence's real splits."""
    rng = np.random.default_rng(b * 31 + hq + page_size)
    args = _case(rng, b, hq, hkv, dh, page_size, max_pages, dtype)
    tunables = AttentionTunables(mma=bool(mma))
    if mma in ("split", "items"):
        tunables = AttentionTunables(pages_per_block=1, split_keys=2 * page_size, work_list=mma == "items")
    want = paged_attention(*args, page_size=page_size, sliding_window=window, implementation="reference")
    got = paged_attention(
        *args, page_size=page_size, sliding_window=window, implementation=_impl(), tunables=tunables
    )
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < TOL[dtype]


@pytest.mark.parametrize(
    "tunables",
    [
        AttentionTunables(pages_per_block=1, split_keys=4),
        AttentionTunables(pages_per_block=1, split_keys=4, longest_first=True),
        AttentionTunables(pages_per_block=2, longest_first=True),
        AttentionTunables(pages_per_block=1, split_keys=4, work_list=True),
    ],
    ids=["split", "split-longest-first", "longest-first", "work-list"],
)
def test_decode_kernel_writes_its_rows_in_place(tunables):
    """The tensor-core kernels (split or not, launched in row order or longest sequence first) on rows
    [row_start, row_start + B) of the step's arrays: those rows equal the reference on the same batch,
    every other row of `out` is kept bit for bit."""
    from pallas_kernels.paged_attention.kernel import paged_decode_attention_kernel

    rng = np.random.default_rng(7)
    q, k, v, pool, layer, tables, pos, lens, _ = _case(rng, 3, 4, 2, 16, 4, 6, jnp.float32)
    want = np.asarray(paged_attention(q, k, v, pool, layer, tables, pos, lens, _, page_size=4))
    n, start = 7, 2

    def wide(x):  # the batch at rows [start, start + 3) of n rows of noise
        noise = jnp.asarray(rng.standard_normal((n, *x.shape[2:])), x.dtype)
        return noise.at[start : start + 3].set(x[:, 0])

    out = jnp.asarray(rng.standard_normal((n, 4, 16)), jnp.float32)
    got = paged_decode_attention_kernel(
        wide(q),
        wide(k),
        wide(v),
        pool,
        layer,
        tables,
        pos[:, 0],
        lens,
        page_size=4,
        tunables=tunables,
        interpret=_impl() == "interpret",
        row_start=start,
        out=out,
    )
    got = np.asarray(got)
    np.testing.assert_allclose(got[start : start + 3], want[:, 0], rtol=1e-4, atol=1e-4)
    keep = np.r_[0:start, start + 3 : n]
    np.testing.assert_array_equal(got[keep], np.asarray(out)[keep])


@pytest.mark.parametrize("max_table_keys,ragged", [(0, True), (32, True), (16, False)])
@pytest.mark.parametrize("variant", ["split", "longest-first"])
def test_ragged_tunings_only_where_the_table_is_short(max_table_keys, ragged, variant):
    """ragged_max_table_keys: the split kernel (or the longest-first grid) where the page table spans at
    most that many keys (8 pages of 4 here: 32), the one-pass kernel in row order beyond it; each gives
    the reference's result."""
    args = _case(np.random.default_rng(0), 2, 4, 2, 16, 4, 8, jnp.float32)
    tunables = AttentionTunables(
        pages_per_block=1,
        split_keys=8 if variant == "split" else 0,
        longest_first=variant == "longest-first",
        ragged_max_table_keys=max_table_keys,
    )

    def attend(*a):
        return paged_attention(*a, page_size=4, implementation="interpret", tunables=tunables)

    jaxpr = str(jax.make_jaxpr(attend)(*args))
    assert ("paged_decode_attention_split" in jaxpr) is (ragged and variant == "split")
    assert ("paged_decode_attention_mma" in jaxpr) is not (ragged and variant == "split")
    assert ("sort" in jaxpr) is (ragged and variant == "longest-first")  # the order of the sequences
    want = paged_attention(*args, page_size=4, implementation="reference")
    np.testing.assert_allclose(np.asarray(attend(*args)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mma", [False, True, "split"])
@pytest.mark.parametrize("b,hq,hkv", [(64, 32, 32), (64, 32, 8), (17, 9, 3)])
def test_decode_kernel_gpu_sweep(b, hq, hkv, mma):
    rng = np.random.default_rng(b + hq)
    args = _case(rng, b, hq, hkv, 128 if hq != 9 else 64, 16, 32, jnp.bfloat16)
    want = paged_attention(*args, page_size=16, implementation="reference")
    tunables = AttentionTunables(mma=bool(mma), split_keys=128 if mma == "split" else 0)
    got = paged_attention(*args, page_size=16, implementation="pallas", tunables=tunables)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() / np.abs(want).max() < TOL[jnp.bfloat16]


def test_bad_pool_raises():
    q = jnp.ones((1, 1, 4, 16))
    k = jnp.ones((1, 1, 2, 16))
    with pytest.raises(ValueError, match="whole pages"):
        paged_attention(
            q,
            k,
            k,
            jnp.ones((1, 10, 16)),
            jnp.int32(0),
            jnp.zeros((1, 2), jnp.int32),
            jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            jnp.ones((1,), jnp.int32),
            page_size=4,
        )


def _prefill_case(rng, b, t, hq, hkv, dh, page_size, max_pages, dtype, layers=2):
    """Chunks of up to t new tokens after random cached prefixes; the table holds prefix and chunk."""
    n_pages = 1 + b * max_pages
    page_units = page_size * 2 * hkv
    pool = rng.standard_normal((layers, n_pages * page_units, dh)).astype(np.float32)
    pool[:, :page_units] = 0.0
    new = rng.integers(1, t + 1, b)
    new[0] = t  # one full chunk
    cached = np.array([rng.integers(0, max_pages * page_size - n + 1) for n in new])
    cached[-1] = 0  # one first chunk (no prefix)
    perm = rng.permutation(np.arange(1, n_pages))
    tables = np.zeros((b, max_pages), np.int32)
    positions = np.zeros((b, t), np.int32)
    for i in range(b):
        used = -(-int(cached[i] + new[i]) // page_size)
        tables[i, :used] = perm[i * max_pages : i * max_pages + used]
        positions[i, : new[i]] = np.arange(cached[i], cached[i] + new[i])
    q = rng.standard_normal((b, t, hq, dh))
    k = rng.standard_normal((b, t, hkv, dh))
    v = rng.standard_normal((b, t, hkv, dh))
    as_ = lambda a, dt=dtype: jnp.asarray(a, dt)  # noqa: E731
    args = (
        as_(q),
        as_(k),
        as_(v),
        as_(pool),
        jnp.int32(layers - 1),
        jnp.asarray(tables),
        jnp.asarray(positions),
        jnp.asarray(cached, jnp.int32),
        jnp.asarray(new, jnp.int32),
    )
    return args, new


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "b,t,hq,hkv,dh,page_size,max_pages,window",
    [
        (3, 8, 4, 4, 16, 4, 6, None),  # MHA
        (2, 20, 6, 2, 32, 8, 6, None),  # GQA 3, chunk not a power of two
        (2, 16, 8, 1, 16, 16, 3, None),  # MQA
        (3, 12, 4, 2, 16, 4, 8, 7),  # sliding window
        (2, 32, 4, 4, 16, 8, 8, None),  # MHA in whole blocks: q, k, v and out in the caller's layout
        (2, 64, 8, 2, 16, 16, 8, 40),  # GQA 4 in whole blocks, sliding window
    ],
)
def test_prefill_kernel_matches_reference(b, t, hq, hkv, dh, page_size, max_pages, window, dtype):
    """Flash-style prefill over cached pages plus the chunk's own keys; rows past a chunk's length
    are padding and not compared."""
    rng = np.random.default_rng(b * 7 + t + hq)
    args, new = _prefill_case(rng, b, t, hq, hkv, dh, page_size, max_pages, dtype)
    want = paged_attention(*args, page_size=page_size, sliding_window=window, implementation="reference")
    got = paged_attention(
        *args, page_size=page_size, sliding_window=window, implementation=_impl(), prefill_kernel=True
    )
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    real = np.arange(t)[None, :] < new[:, None]
    assert np.isfinite(got[real]).all()
    assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("t,hq,hkv", [(128, 32, 32), (256, 32, 8), (77, 9, 3)])
def test_prefill_kernel_gpu_sweep(t, hq, hkv):
    rng = np.random.default_rng(t + hq)
    args, new = _prefill_case(rng, 4, t, hq, hkv, 128 if hq != 9 else 64, 16, 40, jnp.bfloat16)
    want = paged_attention(*args, page_size=16, implementation="reference")
    got = paged_attention(*args, page_size=16, implementation="pallas", prefill_kernel=True)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    real = np.arange(t)[None, :] < new[:, None]
    assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() < TOL[jnp.bfloat16]


@pytest.mark.parametrize("block_queries", [32, 64])
@pytest.mark.parametrize("t,hq,hkv", [(20, 4, 4), (100, 8, 2)])
def test_prefill_kernel_tuned_block_sizes(block_queries, t, hq, hkv):
    """The tuned GPU block sizes (prefill_kernel.TUNED) on chunks shorter than, and not a multiple of,
    a block."""
    rng = np.random.default_rng(t + block_queries)
    args, new = _prefill_case(rng, 2, t, hq, hkv, 16, 8, 16, jnp.float32)
    want = paged_attention(*args, page_size=8, implementation="reference")
    got = paged_attention(
        *args,
        page_size=8,
        implementation=_impl(),
        prefill_kernel=True,
        prefill_tunables=PrefillTunables(block_queries=block_queries),
    )
    got, want = np.asarray(got), np.asarray(want)
    real = np.arange(t)[None, :] < new[:, None]
    assert np.isfinite(got[real]).all()
    assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() < TOL[jnp.float32]


@pytest.mark.parametrize("t,hq,hkv", [(64, 4, 4), (64, 8, 2), (50, 4, 4)])
def test_prefill_kernel_min_programs_shrinks_query_blocks_and_matches_reference(t, hq, hkv):
    """min_programs halves the query block (to a 16-row tile at least) until the grid is that large: few
    sequences on few KV heads, whole blocks (the direct layout) and not, against the reference."""
    from pallas_kernels.paged_attention.prefill_kernel import _shapes

    tunables = PrefillTunables(block_queries=64, min_programs=64)
    group = hq // hkv
    _, block_q, _, tp = _shapes(t, group, tunables, heads=2 * hkv)
    _, block_q0, _, tp0 = _shapes(t, group, tunables)
    assert tp == tp0 and block_q < block_q0 and block_q * (1 << (group - 1).bit_length()) >= 16
    assert 2 * hkv * (tp // block_q) >= 64 or block_q * (1 << (group - 1).bit_length()) == 16
    rng = np.random.default_rng(t + hq)
    args, new = _prefill_case(rng, 2, t, hq, hkv, 16, 8, 24, jnp.float32)
    want = paged_attention(*args, page_size=8, implementation="reference")
    got = paged_attention(
        *args, page_size=8, implementation=_impl(), prefill_kernel=True, prefill_tunables=tunables
    )
    got, want = np.asarray(got), np.asarray(want)
    real = np.arange(t)[None, :] < new[:, None]
    assert np.isfinite(got[real]).all()
    assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() < TOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,t,hkv,dh", [(3, 1, 2, 16), (2, 37, 3, 32), (1, 5, 4, 16)])
def test_write_kv_kernel_matches_reference(b, t, hkv, dh, dtype):
    """The Pallas K/V write against the XLA scatter: every layer's rows at their units, padding tokens
    (unit >= U) dropped, the rest of the pool untouched (any hkv: the rows are written flat). Page 0 is
    the zero page, as in the engine: the kernel writes padding rows there as zeros."""
    rng = np.random.default_rng(b * 100 + t)
    layers, page_size = 3, 4
    page_units = page_size * 2 * hkv
    n_pages = 2 + b * (-(-t // page_size))
    n_units = n_pages * page_units
    pool = rng.standard_normal((layers, n_units, dh))
    pool[:, :page_units] = 0.0
    pool = jnp.asarray(pool, dtype)
    slots = rng.permutation(np.arange(page_size, n_pages * page_size))[: b * t].reshape(b, t)
    write_units = (slots // page_size) * page_units + (slots % page_size) * 2 * hkv
    write_units[-1, -1] = n_units  # a padding token
    k = jnp.asarray(rng.standard_normal((layers, b, t, hkv, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((layers, b, t, hkv, dh)), dtype)
    wu = jnp.asarray(write_units, jnp.int32)
    want = write_kv(pool, k, v, wu, implementation="reference")
    got = write_kv(pool, k, v, wu, implementation=_impl())
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert not np.array_equal(np.asarray(want, np.float32), np.asarray(pool, np.float32))


@pytest.mark.parametrize(
    "max_table_keys,rows,small", [(0, 3, True), (32, 3, True), (16, 3, False), (32, 4, False)]
)
def test_small_batch_tunings_only_for_small_ragged_batches(max_table_keys, rows, small):
    """small_batch_rows: batches of at most that many rows (3 here) whose table is ragged run blocks of
    small_pages_per_block pages (2 of 4 keys: 8-key tiles) split by small_split_keys; larger batches
    or longer tables blocks of pages_per_block (1 page: 4 keys), unsplit. Each gives the reference's
    result."""
    args = _case(np.random.default_rng(1), rows, 4, 2, 16, 4, 8, jnp.float32)
    tunables = AttentionTunables(
        pages_per_block=1,
        longest_first=True,
        ragged_max_table_keys=max_table_keys,
        small_batch_rows=3,
        small_pages_per_block=2,
        small_split_keys=16,
    )

    def attend(*a):
        return paged_attention(*a, page_size=4, implementation="interpret", tunables=tunables)

    jaxpr = str(jax.make_jaxpr(attend)(*args))
    assert ("iota[dimension=0 dtype=int32 shape=(8,)" in jaxpr) is small
    assert ("iota[dimension=0 dtype=int32 shape=(4,)" in jaxpr) is not small
    assert ("paged_decode_attention_split" in jaxpr) is small
    want = paged_attention(*args, page_size=4, implementation="reference")
    np.testing.assert_allclose(np.asarray(attend(*args)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_work_items_pack_each_sequences_real_splits():
    """Sequences of 0, 5, 17 and 3 cached keys, blocks of 2 keys, splits of 2 blocks (4 keys) in a
    20-key table: 1 (the own key's), 2, 5 and 1 splits, packed in sequence order; the rest of the list
    repeats the last entry and is not run."""
    from pallas_kernels.paged_attention.kernel import work_items

    lens = jnp.asarray([0, 5, 17, 3], jnp.int32)
    row, split, count, per_row = work_items(lens, block_keys=2, split_blocks=2, splits=5, table_keys=20)
    assert per_row.tolist() == [1, 2, 5, 1] and count.tolist() == [9]
    assert row[:9].tolist() == [0, 1, 1, 2, 2, 2, 2, 2, 3]
    assert split[:9].tolist() == [0, 0, 1, 0, 1, 2, 3, 4, 0]
    assert set(zip(row[9:].tolist(), split[9:].tolist())) == {(3, 0)}
