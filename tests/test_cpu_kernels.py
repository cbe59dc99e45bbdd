"""The C++ CPU panel kernel (pallas_kernels.cpu) against its reference and XLA's own product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu import PANEL, kernel_available, pack_panels, panel_matmul, panel_matmul_reference
from pallas_kernels.cpu.build import compile_library

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not kernel_available(), reason="CPU panel kernel not built"
)


def _case(m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    return jnp.asarray(x), w


@pytest.mark.parametrize("n", [48, 50, 192, 960])
def test_pack_panels_round_trip(n):
    w = np.random.default_rng(1).standard_normal((3, 40, n), dtype=np.float32)  # stacked layers
    panels = np.asarray(pack_panels(w))
    assert panels.shape == (3, -(-n // PANEL), 40, PANEL)
    back = np.moveaxis(panels, -3, -2).reshape(3, 40, -1)
    np.testing.assert_array_equal(back[..., :n], w)
    assert not back[..., n:].any()  # padding columns are zeros


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (3, 100, 50), (8, 576, 960), (13, 576, 192), (512, 96, 144)])
def test_reference_matches_dense(m, k, n):
    x, w = _case(m, k, n)
    got = panel_matmul_reference(x, pack_panels(w), n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ w, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    "m,k,n", [(1, 64, 48), (3, 100, 50), (8, 576, 960), (9, 576, 192), (13, 1536, 576), (512, 96, 144)]
)
def test_kernel_matches_reference(m, k, n):
    x, w = _case(m, k, n, seed=m + k + n)
    panels = pack_panels(w)
    got = jax.jit(lambda x, p: panel_matmul(x, p, n, implementation="kernel"))(x, panels)
    want = panel_matmul_reference(x, panels, n)
    assert got.shape == (m, n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-4)


@needs_kernel
def test_kernel_keeps_leading_dims_and_zero_rows():
    x, w = _case(6, 64, 96)
    panels = pack_panels(w)
    got = panel_matmul(x.reshape(2, 3, 64), panels, 96, implementation="kernel")
    np.testing.assert_allclose(np.asarray(got).reshape(6, 96), np.asarray(x) @ w, rtol=1e-5, atol=1e-4)
    assert panel_matmul(x[:0], panels, 96, implementation="kernel").shape == (0, 96)


def test_bad_shapes_are_refused():
    x, w = _case(2, 64, 96)
    panels = pack_panels(w)
    with pytest.raises(ValueError, match="width"):
        panel_matmul(x[:, :32], panels, 96)
    with pytest.raises(ValueError, match="panels must be"):
        panel_matmul(x, w, 96)
    with pytest.raises(ValueError, match="outside"):
        panel_matmul(x, panels, 97)
    with pytest.raises(ValueError, match="implementation"):
        panel_matmul(x, panels, 96, implementation="fast")


@needs_kernel
def test_kernel_refuses_other_dtypes():
    x, w = _case(2, 64, 96)
    with pytest.raises(ValueError, match="float32"):
        panel_matmul(x.astype(jnp.bfloat16), pack_panels(w).astype(jnp.bfloat16), 96, implementation="kernel")


def test_build_reports_a_missing_compiler(tmp_path):
    with pytest.raises(RuntimeError, match="failed|compiler"):
        compile_library(compiler=str(tmp_path / "no-such-g++"), folder=str(tmp_path))


def _bgmv_case(seed: int, n: int, h_in: int, h_outs: tuple[int, ...], ranks: list[int]):
    """A pool with random rows and G projections' pairs grouped by token (ranks[t] rows for token t,
    0 for none), padding pairs last (token n, the zero page)."""
    rng = np.random.default_rng(seed)
    layers, units, dh = 2, 300, 32
    pool = rng.standard_normal((layers, units, dh), dtype=np.float32)
    pool[:, 0] = 0  # the zero page
    x = rng.standard_normal((n, h_in), dtype=np.float32)
    k = sum(ranks) + 3  # room for padding pairs
    tis, as_, bs, offs = [], [], [], []
    for h_out in h_outs:
        ti = np.full(k, n, np.int32)
        ti[: sum(ranks)] = np.repeat(np.arange(n), ranks)
        a = np.where(ti < n, rng.integers(1, units - h_in // dh, k), 0).astype(np.int32)
        b = np.where(ti < n, rng.integers(1, units - h_out // dh, k), 0).astype(np.int32)
        tis.append(ti)
        as_.append(a)
        bs.append(b)
        offs.append(np.searchsorted(ti, np.arange(n + 1)).astype(np.int32))
    cat = lambda v: jnp.asarray(np.concatenate(v))  # noqa: E731
    return jnp.asarray(x), jnp.asarray(pool), cat(tis), cat(as_), cat(bs), cat(offs)


@needs_kernel
@pytest.mark.parametrize(
    "n,h_in,h_outs,ranks",
    [(4, 64, (64,), [2, 0, 3, 1]), (8, 128, (128, 32, 32), [4] * 8), (3, 96, (64, 160), [8, 16, 0])],
)
def test_bgmv_matches_lora_reference(n, h_in, h_outs, ranks):
    from pallas_kernels.lora import lora_decode, lora_decode_group

    x, pool, ti, a, b, off = _bgmv_case(n + h_in, n, h_in, h_outs, ranks)
    for layer in (jnp.int32(0), jnp.int32(1)):
        args = (x, pool, layer, ti, a, b, off, h_outs)
        got = jax.jit(lambda *a: lora_decode_group(*a[:7], h_outs, implementation="cpu"))(*args[:7])
        want = lora_decode_group(*args, implementation="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
        k = ti.shape[0] // len(h_outs)  # the first projection alone, offsets searched by the op
        got = lora_decode(x, pool, layer, ti[:k], a[:k], b[:k], h_outs[0], implementation="cpu")
        want = lora_decode(x, pool, layer, ti[:k], a[:k], b[:k], h_outs[0], implementation="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert not np.asarray(got)[np.asarray(ranks) == 0].any()  # a token with no adapter gets no delta


@needs_kernel
def test_bgmv_skips_rows_outside_the_pool():
    """A corrupt start (past the pool) is skipped, never read out of bounds."""
    from pallas_kernels.cpu import bgmv_group

    x, pool, ti, a, b, off = _bgmv_case(3, 2, 64, (64,), [1, 1])
    bad = a.at[0].set(10**6)
    got = np.asarray(bgmv_group(x, pool, jnp.int32(0), bad, b, off, (64,)))
    assert not got[0].any() and got[1].any()


@needs_kernel
@pytest.mark.parametrize(
    "hq,hkv,window,t", [(9, 3, None, 1), (4, 4, None, 1), (8, 2, 5, 1), (9, 3, None, 6), (8, 2, 4, 5)]
)
def test_paged_attention_matches_reference(hq, hkv, window, t):
    """Decode (t = 1) and prefill chunks (t > 1, some rows shorter than t: their padding is not
    compared) after 0 to 12 cached tokens, with and without a sliding window."""
    from pallas_kernels.paged_attention import paged_attention, paged_attention_reference

    rng = np.random.default_rng(hq * 10 + hkv + t)
    layers, page_size, dh, n_pages, b, p = 2, 4, 32, 30, 5, 5
    pool = rng.standard_normal((layers, n_pages * page_size * 2 * hkv, dh), dtype=np.float32)
    tables = rng.permutation(np.arange(1, n_pages))[: b * p].reshape(b, p).astype(np.int32)
    cached = np.array([0, 1, 4, 7, 12], np.int32)  # empty, one page part-full, whole pages
    new = np.minimum(np.array([t, max(t - 2, 1), t, 1, t]), t).astype(np.int32)
    positions = (cached[:, None] + np.arange(t)[None]).astype(np.int32)
    q = rng.standard_normal((b, t, hq, dh), dtype=np.float32)
    k = rng.standard_normal((b, t, hkv, dh), dtype=np.float32)
    v = rng.standard_normal((b, t, hkv, dh), dtype=np.float32)
    args = [jnp.asarray(a) for a in (q, k, v, pool)]
    meta = [jnp.asarray(a) for a in (tables, positions, cached, new)]
    kw = dict(page_size=page_size, sliding_window=window)
    real = np.arange(t)[None] < new[:, None]  # [B, T] rows with a token
    for layer in (jnp.int32(0), jnp.int32(1)):
        got = jax.jit(lambda *a: paged_attention(*a, **kw, implementation="cpu"))(*args, layer, *meta)
        want = paged_attention_reference(*args, layer, *meta, **kw)
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
        assert not np.asarray(got)[~real].any()  # padding rows: zeros


@needs_kernel
@pytest.mark.parametrize("b,t,h_in,h_out,r", [(3, 5, 64, 96, 4), (8, 64, 128, 64, 16)])
def test_sgmv_matches_lora_prefill_reference(b, t, h_in, h_out, r):
    from pallas_kernels.lora import lora_prefill, lora_prefill_reference

    rng = np.random.default_rng(b * t)
    layers, units, dh = 2, 400, 32
    pool = rng.standard_normal((layers, units, dh), dtype=np.float32)
    pool[:, : 2 * (h_in + h_out) // dh] = 0  # the zero page (padding rows point at unit 0)
    a = rng.integers(1, units - h_in // dh, (b, r)).astype(np.int32)
    bs = rng.integers(1, units - h_out // dh, (b, r)).astype(np.int32)
    a[0, r // 2 :] = 0  # sequence 0 has a smaller rank: padding rows
    bs[0, r // 2 :] = 0
    a[1] = bs[1] = 0  # sequence 1 has no adapter
    x = jnp.asarray(rng.standard_normal((b, t, h_in), dtype=np.float32))
    args = (x, jnp.asarray(pool), jnp.int32(1), jnp.asarray(a), jnp.asarray(bs), h_out)
    got = jax.jit(lambda *a: lora_prefill(*a, h_out, implementation="cpu"))(*args[:5])
    want = lora_prefill_reference(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert not np.asarray(got)[1].any()


def test_wrappers_refuse_clearly_without_the_library(monkeypatch):
    """Called directly where the library is absent, a wrapper says so (not XLA's missing-handler error)."""
    from pallas_kernels.cpu import build, lora

    monkeypatch.setattr(build, "kernel_available", lambda: False)
    x, pool, _, a, b, off = _bgmv_case(5, 2, 64, (64,), [1, 1])
    with pytest.raises(ValueError, match="not available"):
        lora.bgmv_group(x, pool, jnp.int32(0), a, b, off, (64,))
    with pytest.raises(ValueError, match="not available"):
        lora.sgmv(x[None], pool, jnp.int32(0), a[None, :2], b[None, :2], 64)
