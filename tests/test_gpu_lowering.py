"""Every Pallas kernel lowers to Triton for a CUDA target, checked here on CPU.

Interpret mode (the CPU tests' path) runs the kernel's jaxpr through XLA and never meets the Triton
lowering, whose rules are stricter: a Python int in a `jnp.where` once lowered as the predicate's
i1 type and broke the grouped LoRA expand on the GPU only. Lowering for `cuda` needs no GPU: the
kernels are traced on abstract shapes and lowered to Triton IR (XLA's GPU compile of that IR is
not run here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lora.kernel import (
    bgmv_expand,
    bgmv_fused,
    bgmv_shrink,
    expand_kernel,
    lora_decode_kernel,
    lora_prefill_kernel,
    sgmv_rows,
)
from pallas_kernels.lora.mixed_kernel import bgmv_sgmv_rows_add
from pallas_kernels.lora.shapes import LoraTunables
from pallas_kernels.paged_attention.kernel import AttentionTunables, paged_decode_attention_kernel
from pallas_kernels.paged_attention.mixed_kernel import paged_attention_mixed_kernel
from pallas_kernels.paged_attention.prefill_kernel import (
    PrefillTunables,
    paged_prefill_attention_kernel,
    paged_prefill_attention_rows,
)
from pallas_kernels.paged_attention.write_kernel import write_kv_kernel

S = jax.ShapeDtypeStruct
I32 = jnp.int32
DH, LAYERS, UNITS = 64, 2, 4096


def _lower_for_cuda(fn, *shapes, call: str = "xla.gpu.triton") -> str:
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert call in text  # the kernel became a Triton (or Mosaic GPU) call, not an XLA fallback
    return text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "tunables", [LoraTunables(), LoraTunables(shrink_pairs=4, shrink_num_warps=1, chunk_units=32)]
)
def test_bgmv_shrink_lowers(dtype, tunables):
    n, k = 8, 48
    text = _lower_for_cuda(
        lambda x, pool, layer, tok, a: bgmv_shrink(x, pool, layer, tok, a, tunables=tunables),
        S((n, 512), dtype),
        S((LAYERS, UNITS, DH), dtype),
        S((), I32),
        S((k,), I32),
        S((k,), I32),
    )
    assert "bgmv_shrink" in text


@pytest.mark.parametrize("backend", ["triton", "mosaic", "triton-lanes"])
@pytest.mark.parametrize("h_outs", [(512,), (512, 128, 128), (256, 1024)])
@pytest.mark.parametrize("max_rank", [16, 64])
def test_bgmv_expand_lowers(h_outs, max_rank, backend):
    """Every expand lowers for CUDA here: Triton's (with its rank bucket's loads, or 16 pairs a load)
    as a Triton call, the Mosaic GPU one as a Mosaic GPU call (and no Triton)."""
    g, n, k = len(h_outs), 8, 48
    if backend == "triton-lanes":
        tunables = LoraTunables(expand_lanes=16)
    else:
        tunables = LoraTunables(expand_backend=backend)
    text = _lower_for_cuda(
        lambda s, pool, layer, b, off: expand_kernel(tunables)(
            s,
            pool,
            layer,
            b,
            off,
            h_outs=h_outs,
            dtype=jnp.dtype(jnp.bfloat16),
            tunables=tunables,
            max_rank=max_rank,
        ),
        S((g * k,), jnp.float32),
        S((LAYERS, UNITS, DH), jnp.bfloat16),
        S((), I32),
        S((g * k,), I32),
        S((g * (n + 1),), I32),
        call="mosaic_gpu" if backend == "mosaic" else "xla.gpu.triton",
    )
    if backend != "mosaic":
        assert "bgmv_expand" in text
    else:
        assert "xla.gpu.triton" not in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h_outs", [(512,), (512, 128, 128)])
@pytest.mark.parametrize("max_rank", [16, 64])
@pytest.mark.parametrize("columns", [0, 64])
def test_decode_by_adapter_lowers(h_outs, max_rank, dtype, columns):
    """Decode by adapter (by_adapter_min_rank): its shrink and its expand added into y in place, two Triton
    calls and no BGMV."""
    g, n = len(h_outs), 8
    k = n * max_rank
    tunables = LoraTunables(by_adapter_min_rank=16, sgmv_shrink_columns=columns)
    text = _lower_for_cuda(
        lambda x, pool, layer, tok, a, b, off, y: lora_decode_kernel(
            x,
            pool,
            layer,
            tok,
            a,
            b,
            off,
            h_outs=h_outs,
            tunables=tunables,
            max_rank=max_rank,
            y=y,
            row_start=4,
        ),
        S((n + 6, 512), dtype),
        S((LAYERS, UNITS, DH), dtype),
        S((), I32),
        S((g * k,), I32),
        S((g * k,), I32),
        S((g * k,), I32),
        S((g * (n + 1),), I32),
        S((n + 6, sum(h_outs)), dtype),
    )
    assert text.count("xla.gpu.triton") == 2
    assert "bgmv_by_adapter_shrink" in text and "bgmv_by_adapter_expand_add" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h_outs", [(512,), (512, 128, 128)])
@pytest.mark.parametrize("max_rank", [16, 64])
def test_bgmv_fused_lowers(h_outs, max_rank, dtype):
    g, n, k = len(h_outs), 8, 48
    text = _lower_for_cuda(
        lambda x, pool, layer, a, b, off: bgmv_fused(
            x,
            pool,
            layer,
            a,
            b,
            off,
            h_outs=h_outs,
            tunables=LoraTunables(fused_max_tokens=64),
            max_rank=max_rank,
        ),
        S((n, 512), dtype),
        S((LAYERS, UNITS, DH), dtype),
        S((), I32),
        S((g * k,), I32),
        S((g * k,), I32),
        S((g * (n + 1),), I32),
    )
    assert "bgmv_fused" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "h_outs,r,width", [((256,), 16, 16), ((512, 128, 128), 16, 64), ((256, 256), 32, 64)]
)
@pytest.mark.parametrize("columns", [0, 16])
def test_sgmv_lowers(dtype, h_outs, r, width, columns):
    """One projection, and groups (one shrink and one expand launch for all members); the shrink's
    columns in one program or in blocks of 16."""
    b, t = 2, 64
    text = _lower_for_cuda(
        lambda x, pool, layer, a, bb: lora_prefill_kernel(
            x, pool, layer, a, bb, h_outs=h_outs, rank=r, tunables=LoraTunables(sgmv_shrink_columns=columns)
        ),
        S((b, t, 512), dtype),
        S((LAYERS, UNITS, DH), dtype),
        S((), I32),
        S((b, width), I32),
        S((b, width), I32),
    )
    assert text.count("xla.gpu.triton") == 2  # shrink and expand


def _attention_shapes(b, t, hq, hkv, dtype, page_size=16, max_pages=8):
    pool_units = (1 + b * max_pages) * page_size * 2 * hkv
    q_shape = (b, hq, DH) if t is None else (b, t, hq, DH)
    kv_shape = (b, hkv, DH) if t is None else (b, t, hkv, DH)
    pos_shape = (b,) if t is None else (b, t)
    return [
        S(q_shape, dtype),
        S(kv_shape, dtype),
        S(kv_shape, dtype),
        S((LAYERS, pool_units, DH), dtype),
        S((), I32),
        S((b, max_pages), I32),
        S(pos_shape, I32),
        S((b,), I32),
    ]


@pytest.mark.parametrize("mma", [True, False, "split", "longest-first", "split-longest-first", "split-items"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 24])
def test_decode_attention_lowers(mma, hq, hkv, window):
    """split: the flash-decoding variant, 8 pages in splits of one; longest-first: the grid walks the
    sequences by decreasing length."""
    tun = AttentionTunables(mma=bool(mma), longest_first="longest" in str(mma))
    if str(mma).startswith("split"):
        tun = AttentionTunables(
            pages_per_block=1, split_keys=16, longest_first="longest" in mma, work_list="items" in mma
        )
    text = _lower_for_cuda(
        lambda *a: paged_decode_attention_kernel(*a, page_size=16, sliding_window=window, tunables=tun),
        *_attention_shapes(4, None, hq, hkv, jnp.bfloat16),
    )
    assert ("paged_decode_attention_split" in text) == (str(mma).startswith("split") and "items" not in mma)
    assert ("paged_decode_attention_items" in text) == ("items" in str(mma))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hq,hkv,t", [(8, 8, 32), (8, 2, 20), (8, 1, 64)])
@pytest.mark.parametrize("window", [None, 24])
def test_prefill_attention_lowers(dtype, hq, hkv, t, window):
    shapes = _attention_shapes(2, t, hq, hkv, dtype) + [S((2,), I32)]
    _lower_for_cuda(
        lambda *a: paged_prefill_attention_kernel(
            *a, page_size=16, sliding_window=window, tunables=PrefillTunables()
        ),
        *shapes,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,t,hkv", [(16, 1, 8), (2, 37, 3)])
def test_write_kv_lowers(dtype, b, t, hkv):
    text = _lower_for_cuda(
        lambda pool, k, v, wu: write_kv_kernel(pool, k, v, wu),
        S((LAYERS, UNITS, DH), dtype),
        S((LAYERS, b, t, hkv, DH), dtype),
        S((LAYERS, b, t, hkv, DH), dtype),
        S((b, t), I32),
    )
    assert "write_kv" in text


def test_mixed_step_row_kernels_lower():
    """The kernels of a mixed step's batches on their rows of the step's arrays (row offsets, outputs
    aliased to the array they add into or write), as paged.forward_paged runs them on the GPU."""
    n_all, n, start, h_outs = 40, 8, 30, (512, 128, 128)
    tun = LoraTunables()
    text = _lower_for_cuda(
        lambda x, pool, layer, tok, a: bgmv_shrink(
            x, pool, layer, tok, a, tunables=tun, row_start=start, n_tokens=n
        ),
        S((n_all, 512), jnp.bfloat16),
        S((LAYERS, UNITS, DH), jnp.bfloat16),
        S((), I32),
        S((48,), I32),
        S((48,), I32),
    )
    text = _lower_for_cuda(
        lambda s, pool, layer, b, off, y: bgmv_expand(
            s,
            pool,
            layer,
            b,
            off,
            h_outs=h_outs,
            dtype=jnp.dtype(jnp.bfloat16),
            tunables=tun,
            y=y,
            row_start=start,
        ),
        S((3 * 48,), jnp.float32),
        S((LAYERS, UNITS, DH), jnp.bfloat16),
        S((), I32),
        S((3 * 48,), I32),
        S((3 * (n + 1),), I32),
        S((n_all, sum(h_outs)), jnp.bfloat16),
    )
    assert "bgmv_expand_add" in text
    text = _lower_for_cuda(
        lambda x, pool, layer, a, b, y: sgmv_rows(
            x, pool, layer, a, b, y, h_outs=h_outs, rank=16, tunables=tun, seq_len=32, row_start=6
        ),
        S((6 + 64, 512), jnp.bfloat16),
        S((LAYERS, UNITS, DH), jnp.bfloat16),
        S((), I32),
        S((2, 64), I32),
        S((2, 64), I32),
        S((6 + 64, sum(h_outs)), jnp.bfloat16),
    )
    assert text.count("xla.gpu.triton") == 2 and "sgmv_expand_add" in text
    dec = _attention_shapes(6, None, 8, 2, jnp.bfloat16)
    rows = 6 + 2 * 32
    flat = [S((rows, 8, DH), jnp.bfloat16), S((rows, 2, DH), jnp.bfloat16), S((rows, 2, DH), jnp.bfloat16)]
    _lower_for_cuda(
        lambda *a: paged_decode_attention_kernel(*a[:-1], page_size=16, row_start=0, out=a[-1]),
        *flat,
        *dec[3:],
        flat[0],
    )
    pre = _attention_shapes(2, 32, 8, 2, jnp.bfloat16) + [S((2,), I32)]
    _lower_for_cuda(
        lambda *a: paged_prefill_attention_rows(*a, row_start=6, page_size=16, tunables=PrefillTunables()),
        *flat,
        *pre[3:],
        flat[0],
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "tunables",
    [LoraTunables(mixed_launch=True), LoraTunables(mixed_launch=True, mixed_num_warps=1, out_units=2)],
)
def test_mixed_lora_launches_lower(dtype, tunables):
    """A mixed step's BGMV and SGMV in one shrink and one expand launch (q/k/v of GQA: 17 decode rows of
    rank bucket 64, then a 128-token chunk of rank 64)."""
    h_outs, n_dec, k, t = (512, 128, 128), 17, 17 * 64, 128
    n_all = n_dec + t
    text = _lower_for_cuda(
        lambda y, x, pool, layer, tok, a, b, off, ap, bp: bgmv_sgmv_rows_add(
            y,
            x,
            pool,
            layer,
            tok,
            a,
            b,
            off,
            ap,
            bp,
            h_outs=h_outs,
            max_rank=64,
            rank=64,
            seq_len=t,
            decode_row_start=0,
            prefill_row_start=n_dec,
            decode_tunables=tunables,
            prefill_tunables=tunables,
        ),  # fmt: skip
        S((n_all, sum(h_outs)), dtype),
        S((n_all, 512), dtype),
        S((LAYERS, UNITS, DH), dtype),
        S((), I32),
        S((3 * k,), I32),
        S((3 * k,), I32),
        S((3 * k,), I32),
        S((3 * (n_dec + 1),), I32),
        S((1, 256), I32),
        S((1, 256), I32),
    )
    assert text.count("xla.gpu.triton") == 2
    assert "mixed_lora_shrink" in text and "mixed_lora_expand_add" in text


@pytest.mark.parametrize(
    "decode_tunables",
    [
        AttentionTunables(),
        AttentionTunables(longest_first=True),
        AttentionTunables(split_keys=64, longest_first=True),
    ],
)
@pytest.mark.parametrize("hq,hkv,block_queries", [(8, 8, 64), (8, 2, 32)])
@pytest.mark.parametrize("given_out,window", [(False, None), (True, None), (True, 24)])
def test_mixed_attention_launch_lowers(decode_tunables, hq, hkv, block_queries, given_out, window):
    """A mixed step's 17 decode rows and one 128-token chunk in one attention launch (bf16, page 16)."""
    b_dec, t, p = 17, 128, 8
    n = b_dec + t
    dt = jnp.bfloat16
    pool = S((LAYERS, (1 + 32 * p) * 16 * 2 * hkv, DH), dt)
    qkv = [S((n, hq, DH), dt), S((n, hkv, DH), dt), S((n, hkv, DH), dt)]
    decode = (S((b_dec, p), I32), S((b_dec,), I32), S((b_dec,), I32))
    prefill = (S((1, p), I32), S((1, t), I32), S((1,), I32), S((1,), I32))
    pre_t = PrefillTunables(block_queries=block_queries, mixed_launch=True)

    def fn(q, k, v, pool, layer, decode, prefill, out):
        return paged_attention_mixed_kernel(
            q, k, v, pool, layer, decode, prefill, out, page_size=16, sliding_window=window,
            decode_tunables=decode_tunables, prefill_tunables=pre_t, decode_row_start=0, prefill_row_start=b_dec,
        )  # fmt: skip

    out = S((n, hq, DH), dt) if given_out else None
    text = _lower_for_cuda(fn, *qkv, pool, S((), I32), decode, prefill, out)
    assert text.count("xla.gpu.triton") == 1 and "paged_attention_mixed" in text
