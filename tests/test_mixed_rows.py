"""A mixed step's kernels on their batch's rows of the step's arrays (row offsets, outputs in place)
against the same batches computed apart by the references: paged attention (decode rows and a prefill
chunk batch in one q/k/v array) and the BGMV/SGMV deltas added into their rows of a projection's
output. Rows outside a batch keep their values exactly. Interpret mode on CPU, compiled on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora import (
    LoraTunables,
    lora_decode_group,
    lora_decode_group_add,
    lora_mixed_group_add,
    lora_prefill_group,
    lora_prefill_group_add,
    mixed_supported,
    prefill_group_width,
)
from pallas_kernels.paged_attention import (
    AttentionTunables,
    PrefillTunables,
    paged_attention,
    paged_attention_mixed_rows,
    paged_attention_rows,
    prefill_kernel,
)
from pallas_kernels.paged_attention import kernel as attention_kernel
from tests.test_lora_kernels import FUSED, _check, _group_pairs, _grouped_case, _pool
from tests.test_paged_attention_kernel import TOL, _case, _prefill_case


def _impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "interpret"


def _embed(rng, rows: jax.Array, n_all: int, start: int) -> jax.Array:
    """rows placed at [start, start + len) of a random [n_all, ...] array."""
    out = jnp.asarray(rng.standard_normal((n_all, *rows.shape[1:])), rows.dtype)
    return out.at[start : start + rows.shape[0]].set(rows)


def _check_rows(got, want, start: int, n: int, before, dtype=jnp.float32) -> None:
    """Rows [start, start + n) close to want; every other row exactly as before."""
    got, before = np.asarray(got, np.float32), np.asarray(before, np.float32)
    _check(got[start : start + n], want, dtype)
    keep = np.ones(got.shape[0], bool)
    keep[start : start + n] = False
    np.testing.assert_array_equal(got[keep], before[keep])


@pytest.mark.parametrize("tunables", [None, FUSED[0]])
def test_decode_group_add_equals_deltas_on_its_rows(tunables):
    """q/k/v of a GQA model (unequal widths), mixed ranks and a token with no adapter, rows 9..16 of a
    20-row step; the one-launch BGMV (FUSED) takes the slice-and-add path."""
    rng = np.random.default_rng(5)
    n_tokens, h_in, widths, start, n_all = 7, 64, (64, 32, 32), 9, 20
    ranks = [int(rng.choice((0, 1, 4, 16))) for _ in range(n_tokens)]
    layer = jnp.int32(0)
    x, pool, tok, a_all, b_all = _grouped_case(n_tokens, ranks, h_in, widths)
    meta = _group_pairs(tok, a_all, b_all, n_tokens)
    want = lora_decode_group(x, pool, layer, *meta, widths, implementation="reference", max_rank=16)
    x_all = _embed(rng, x, n_all, start)
    y = jnp.asarray(rng.standard_normal((n_all, sum(widths))), jnp.float32)
    got = lora_decode_group_add(
        y,
        x_all,
        pool,
        layer,
        *meta,
        widths,
        row_start=start,
        implementation=_impl(),
        tunables=tunables,
        max_rank=16,
    )
    _check_rows(got, y[start : start + n_tokens] + want, start, n_tokens, y)


def _prefill_starts(batch, r, widths, used, h_in, dh, first_unit):
    """A prompt batch's PrefillGroup columns (member m's used rows at [m * r, ...)) from first_unit on,
    and the units they take."""
    units_in, g = h_in // dh, len(widths)
    width = prefill_group_width(g, r) if g > 1 else r
    a, b = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
    unit = first_unit
    for m, h_out in enumerate(widths):
        for i in range(batch):
            for j in range(used[m][i]):
                a[i, m * r + j], b[i, m * r + j] = unit, unit + units_in
                unit += units_in + h_out // dh
    return jnp.asarray(a), jnp.asarray(b), unit - first_unit


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "batch,t,r,widths,used,start,n_all",
    [
        (2, 16, 16, (96, 32, 32), ((16, 3), (5, 0), (16, 16)), 5, 45),  # q/k/v of GQA after 5 decode rows
        (1, 32, 16, (64,), ((9,),), 3, 35),  # one projection (o), rows 3..35: the step's last rows
        (2, 8, 16, (64,), ((4, 16),), 2, 18),  # chunks too short for the kernel: slice and add
    ],
)
def test_prefill_group_add_equals_deltas_on_its_rows(batch, t, r, widths, used, start, n_all, dtype):
    rng = np.random.default_rng(batch * 10 + t + start)
    h_in, dh, g = 64, 16, len(widths)
    units_in = h_in // dh
    pool = _pool(rng, 3, 8 + g * batch * r * (units_in + max(widths) // dh), dh, dtype)
    a, b, _ = _prefill_starts(batch, r, widths, used, h_in, dh, 8)
    x = jnp.asarray(rng.standard_normal((batch, t, h_in)), dtype)
    layer = jnp.int32(1)
    want = lora_prefill_group(x, pool, layer, a, b, widths, r, implementation="reference")
    x_all = _embed(rng, x.reshape(batch * t, h_in), n_all, start)
    y = jnp.asarray(rng.standard_normal((n_all, sum(widths))), dtype)
    got = lora_prefill_group_add(
        y, x_all, pool, layer, a, b, widths, r, row_start=start, seq_len=t, implementation=_impl()
    )
    n = batch * t
    want_rows = y[start : start + n].astype(jnp.float32) + want.reshape(n, -1).astype(jnp.float32)
    _check_rows(got, want_rows, start, n, y, dtype)


def _shared_pool(decode_args, prefill_args, page_units: int):
    """Both cases' pools as one (the decode case's pages after the prefill case's)."""
    shift = prefill_args[3].shape[1] // page_units
    pool = jnp.concatenate([prefill_args[3], decode_args[3]], axis=1)
    tables = jnp.where(decode_args[5] > 0, decode_args[5] + shift, 0)
    return pool, tables


class _MixedAttentionCase:
    """A mixed step's attention inputs: b_dec decode rows first, then b_pre chunks of t tokens, then 3 rows
    of neither, in one pool; and each batch's reference output."""

    def __init__(self, rng, b_dec, b_pre, t, hq, hkv, dh, page_size, dtype, window=None):
        dec = _case(rng, b_dec, hq, hkv, dh, page_size, 6, dtype)
        pre, self.new = _prefill_case(rng, b_pre, t, hq, hkv, dh, page_size, 8, dtype)
        pool, dec_tables = _shared_pool(dec, pre, page_size * 2 * hkv)
        self.dec = (*dec[:3], pool, dec[4], dec_tables, *dec[6:])
        self.pre = (*pre[:3], pool, *pre[4:])
        ref = dict(page_size=page_size, sliding_window=window, implementation="reference")
        self.want_dec = paged_attention(*self.dec, **ref)
        self.want_pre = paged_attention(*self.pre, **ref)
        self.b_dec, self.n_pre, self.t, self.hq, self.dh, self.dtype = b_dec, b_pre * t, t, hq, dh, dtype
        self.n_all = b_dec + self.n_pre + 3
        flat = [
            jnp.concatenate([d.reshape(b_dec, *d.shape[2:]), p.reshape(self.n_pre, *p.shape[2:])])
            for d, p in zip(self.dec[:3], self.pre[:3])
        ]
        self.q, self.k, self.v = (_embed(rng, x, self.n_all, 0) for x in flat)

    def check(self, out) -> np.ndarray:
        """Both batches' rows of the step's output close to their references (the chunks' real tokens)."""
        got = np.asarray(out, np.float32)
        b_dec, n_pre, tol = self.b_dec, self.n_pre, TOL[self.dtype]
        want_dec = np.asarray(self.want_dec, np.float32).reshape(b_dec, self.hq, self.dh)
        assert np.abs(got[:b_dec] - want_dec).max() / np.abs(want_dec).max() < tol
        real = (np.arange(self.t)[None, :] < self.new[:, None]).reshape(-1)
        got_pre = got[b_dec : b_dec + n_pre][real]
        want_pre = np.asarray(self.want_pre, np.float32).reshape(n_pre, self.hq, self.dh)[real]
        assert np.isfinite(got_pre).all()
        assert np.abs(got_pre - want_pre).max() / np.abs(want_pre).max() < tol
        return got


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "b_dec,b_pre,t,hq,hkv,dh,page_size",
    [
        (3, 2, 32, 4, 4, 16, 8),  # MHA, chunks in whole kernel blocks
        (5, 1, 64, 8, 2, 16, 16),  # GQA 4, whole blocks
        (2, 2, 20, 4, 2, 16, 8),  # a chunk that is not whole blocks: slice, attend, write
    ],
)
def test_attention_rows_equal_each_batch_apart(b_dec, b_pre, t, hq, hkv, dh, page_size, dtype):
    """A mixed step's layout: decode rows first, then the prefill batch, then 3 rows of neither (kept);
    the decode kernel writes a new output and the prefill kernel writes into it."""
    case = _MixedAttentionCase(
        np.random.default_rng(b_dec * 10 + t), b_dec, b_pre, t, hq, hkv, dh, page_size, dtype
    )
    q, k, v, window = case.q, case.k, case.v, dict(page_size=page_size, implementation=_impl())
    out = paged_attention_rows(q, k, v, *case.dec[3:], None, row_start=0, **window)
    before = out
    out = paged_attention_rows(q, k, v, *case.pre[3:], out, row_start=b_dec, **window)
    got = case.check(out)
    np.testing.assert_array_equal(got[:b_dec], np.asarray(before, np.float32)[:b_dec])  # kept


def test_rows_outside_the_arrays_raise():
    x, y = jnp.zeros((4, 16)), jnp.zeros((4, 16))
    with pytest.raises(ValueError, match="not within"):
        lora_prefill_group_add(
            y,
            x,
            jnp.zeros((1, 8, 16)),
            jnp.int32(0),
            jnp.zeros((1, 16), jnp.int32),
            jnp.zeros((1, 16), jnp.int32),
            (16,),
            16,
            row_start=2,
            seq_len=4,
        )
    q = jnp.zeros((3, 2, 16))
    with pytest.raises(ValueError, match="not within"):
        paged_attention_rows(
            q,
            q,
            q,
            jnp.zeros((1, 64, 16)),
            jnp.int32(0),
            jnp.zeros((2, 1), jnp.int32),
            jnp.zeros((2, 1), jnp.int32),
            jnp.zeros((2,), jnp.int32),
            jnp.ones((2,), jnp.int32),
            row_start=2,
            page_size=16,
        )


@pytest.mark.parametrize(
    "widths,ranks,max_rank,batch,t,r,used,tunables",
    [
        # q/k/v of GQA: 7 decode rows of mixed ranks (one without), 2 chunks of 16 at rank 16
        (
            (64, 32, 32),
            (0, 1, 4, 16),
            16,
            2,
            16,
            16,
            ((16, 3), (5, 0), (16, 16)),
            LoraTunables(mixed_launch=True),
        ),
        # o alone: 5 decode rows, one 32-token chunk at rank 32, both launches on 2 warps
        ((64,), (2, 8), 8, 1, 32, 32, ((32,),), LoraTunables(mixed_launch=True, mixed_num_warps=2)),
        # a chunk too short for the SGMV kernel: each batch's own launches
        ((64,), (2, 8), 8, 2, 8, 16, ((4, 16),), LoraTunables(mixed_launch=True)),
        # mixed_launch off: each batch's own launches
        ((64, 32, 32), (1, 4), 4, 1, 16, 16, ((3,), (16,), (1,)), LoraTunables()),
    ],
)
def test_mixed_launch_equals_each_batch_apart(widths, ranks, max_rank, batch, t, r, used, tunables):
    """A mixed step's rows: decode rows first, then the prompt batch, then 3 rows of neither (kept). The
    BGMV and SGMV deltas added in one shrink and one expand launch (lora_mixed_group_add) equal the
    reference's, each batch apart, on the same pool."""
    rng = np.random.default_rng(len(widths) * 100 + t)
    h_in, dh, n_dec = 64, 16, 7 if len(widths) > 1 else 5
    dec_ranks = [int(rng.choice(ranks)) for _ in range(n_dec)]
    x_dec, pool, tok, a_all, b_all = _grouped_case(n_dec, dec_ranks, h_in, widths)
    decode = _group_pairs(tok, a_all, b_all, n_dec)
    a_pre, b_pre, used_units = _prefill_starts(batch, r, widths, used, h_in, dh, pool.shape[1])
    pool = jnp.concatenate([pool, _pool(rng, pool.shape[0], used_units, dh, jnp.float32)], axis=1)
    layer = jnp.int32(1)
    n_pre = batch * t
    x_pre = jnp.asarray(rng.standard_normal((n_pre, h_in)), jnp.float32)
    n_all = n_dec + n_pre + 3
    x = _embed(rng, jnp.concatenate([x_dec, x_pre]), n_all, 0)
    y = jnp.asarray(rng.standard_normal((n_all, sum(widths))), jnp.float32)
    want_dec = lora_decode_group(
        x_dec, pool, layer, *decode, widths, implementation="reference", max_rank=max_rank
    )
    want_pre = lora_prefill_group(
        x_pre.reshape(batch, t, h_in), pool, layer, a_pre, b_pre, widths, r, implementation="reference"
    ).reshape(n_pre, -1)

    def mixed(y, x, pool):
        return lora_mixed_group_add(
            y, x, pool, layer, decode, (a_pre, b_pre), widths, decode_row_start=0, prefill_row_start=n_dec,
            max_rank=max_rank, rank=r, seq_len=t, implementation=_impl(), tunables=tunables,
        )  # fmt: skip

    one_launch = mixed_supported(n_dec, max_rank, t, r, tunables, tunables)
    assert ("mixed_lora_expand_add" in str(jax.make_jaxpr(mixed)(y, x, pool))) == one_launch
    got = mixed(y, x, pool)
    want = y[: n_dec + n_pre] + jnp.concatenate([want_dec, want_pre])
    _check_rows(got, want, 0, n_dec + n_pre, y)


def test_mixed_launch_only_where_both_batches_run_their_plain_kernels():
    plain = LoraTunables(mixed_launch=True)
    assert mixed_supported(17, 64, 128, 64, plain, plain)
    assert not mixed_supported(17, 64, 128, 64, plain, LoraTunables())  # off in the chunk's tier
    assert not mixed_supported(17, 64, 8, 16, plain, plain)  # chunk shorter than a tile
    assert not mixed_supported(4, 16, 128, 16, LoraTunables(fused_max_tokens=8), plain)  # fused decode
    assert not mixed_supported(17, 64, 128, 16, LoraTunables(by_adapter_min_rank=64), plain)
    assert not mixed_supported(17, 16, 128, 16, LoraTunables(expand_backend="mosaic"), plain)


@pytest.mark.parametrize(
    "decode_tunables",
    [
        AttentionTunables(),  # (sequence, KV head), unsplit
        AttentionTunables(longest_first=True),  # longest first
        AttentionTunables(split_keys=32),  # two 32-key splits of 48-key tables, combined after
        AttentionTunables(
            split_keys=32, longest_first=True, pages_per_block=2
        ),  # 16-key blocks, 2 splits of 2
        AttentionTunables(work_list=True, split_keys=32),  # not joined: each batch's own launch
    ],
)
@pytest.mark.parametrize("given_out,window", [(False, None), (True, None), (True, 20)])
def test_attention_mixed_launch_equals_each_batch_apart(decode_tunables, given_out, window, monkeypatch):
    """A mixed step's decode rows and prompt chunks (GQA 4: 8/2 heads, 2 chunks of 32) in one attention
    launch (PrefillTunables.mixed_launch, paged_attention_mixed_rows) against each batch's reference;
    with an out given, the 3 rows of neither batch keep its values; window: a sliding window of 20 keys."""
    b_dec, b_pre, t, hq, hkv, dh, page_size, dtype = 5, 2, 32, 8, 2, 16, 8, jnp.float32
    monkeypatch.setitem(attention_kernel.TUNED, (page_size, dh), decode_tunables)
    pre_t = PrefillTunables(block_queries=16, mixed_launch=True)
    monkeypatch.setitem(prefill_kernel.TUNED, (page_size, dh, hq // hkv), pre_t)
    rng = np.random.default_rng(11)
    case = _MixedAttentionCase(rng, b_dec, b_pre, t, hq, hkv, dh, page_size, dtype, window)
    q, k, v, pool, layer = case.q, case.k, case.v, case.dec[3], case.dec[4]
    out = jnp.asarray(rng.standard_normal(q.shape), dtype) if given_out else None

    def mixed(q, k, v, out):
        return paged_attention_mixed_rows(
            q, k, v, pool, layer, case.dec[5:], case.pre[5:], out, decode_row_start=0, prefill_row_start=b_dec,
            page_size=page_size, sliding_window=window, implementation=_impl(),
        )  # fmt: skip

    one_launch = not decode_tunables.work_list
    assert ("paged_attention_mixed" in str(jax.make_jaxpr(mixed)(q, k, v, out))) == one_launch
    got = case.check(mixed(q, k, v, out))
    with pytest.raises(ValueError, match="not within"):  # the chunks' rows run 1 past the step's
        paged_attention_mixed_rows(
            q, k, v, pool, layer, case.dec[5:], case.pre[5:], out, decode_row_start=0, prefill_row_start=b_dec + 4,
            page_size=page_size, implementation=_impl(),
        )  # fmt: skip
    if given_out:
        kept = b_dec + b_pre * t
        np.testing.assert_array_equal(got[kept:], np.asarray(out, np.float32)[kept:])
