"""Paged attention and K/V writes over the unified pool. The public functions validate, then pick
the kernel or the reference (pallas_kernels.backend.IMPLEMENTATIONS).

Decode steps (one query per sequence) take the Pallas kernel on GPU, and so does the write of a
step's new K/V into the pool (write_kv). Prefill chunks take the
flash-style prefill kernel where `prefill_kernel` says so (default PREFILL_KERNEL: on the GPU and in
interpret mode), else the reference, as every other backend. A mixed step's decode rows and prompt
chunk take one launch where PrefillTunables.mixed_launch says so (paged_attention_mixed_rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import cpu_kernels, resolve
from pallas_kernels.cpu import attention_supported
from pallas_kernels.cpu import paged_attention as cpu_paged_attention
from pallas_kernels.paged_attention.kernel import (
    AttentionTunables,
    paged_decode_attention_kernel,
    tunables_for,
)
from pallas_kernels.paged_attention.mixed_kernel import (
    mixed_attention_supported,
    paged_attention_mixed_kernel,
)
from pallas_kernels.paged_attention.prefill_kernel import (
    PrefillTunables,
    paged_prefill_attention_kernel,
    paged_prefill_attention_rows,
    prefill_direct,
)
from pallas_kernels.paged_attention.prefill_kernel import tunables_for as prefill_tunables_for
from pallas_kernels.paged_attention.reference import (
    paged_attention_reference,
    write_kv_layer_reference,
    write_kv_reference,
)
from pallas_kernels.paged_attention.write_kernel import write_kv_kernel

# path -> whether prefill chunks take the prefill kernel by default. On the H100 (bench/kernels/
# attention.py, 8 x 256-token chunks over 1,024 cached keys) it takes 307 us MHA and 190 us GQA 32/8
# where the reference takes 1,002 and 943 us.
PREFILL_KERNEL = {"interpret": True, "pallas": True}

__all__ = [
    "PREFILL_KERNEL",
    "AttentionTunables",
    "PrefillTunables",
    "paged_attention",
    "paged_attention_mixed_rows",
    "paged_attention_reference",
    "paged_attention_rows",
    "write_kv",
    "write_kv_layer",
    "write_kv_layer_reference",
    "write_kv_reference",
]


def write_kv(pool, k, v, write_units, *, implementation: str = "reference") -> jax.Array:
    if k.shape != v.shape or k.ndim != 5 or write_units.shape != k.shape[1:3]:
        raise ValueError(
            f"k {k.shape}, v {v.shape} must be [L, B, T, Hkv, Dh]; write_units {write_units.shape} [B, T]"
        )
    if pool.ndim != 3 or pool.shape[2] != k.shape[4] or pool.shape[0] != k.shape[0]:
        raise ValueError(f"pool {pool.shape} does not match k {k.shape}")
    path = resolve(implementation)
    if path == "reference":  # one XLA scatter
        return write_kv_reference(pool, k, v, write_units)
    return write_kv_kernel(pool, k, v, write_units, interpret=path == "interpret")


def write_kv_layer(pool, layer, k, v, write_units) -> jax.Array:
    """write_kv for one layer: k, v [B, T, Hkv, Dh] into layer `layer` ([] int32) of the pool."""
    if k.shape != v.shape or k.ndim != 4 or write_units.shape != k.shape[:2]:
        raise ValueError(
            f"k {k.shape}, v {v.shape} must be [B, T, Hkv, Dh]; write_units {write_units.shape} [B, T]"
        )
    if pool.ndim != 3 or pool.shape[2] != k.shape[3]:
        raise ValueError(f"pool {pool.shape} does not match k {k.shape}")
    return write_kv_layer_reference(pool, layer, k, v, write_units)


def paged_attention(
    q,
    k_new,
    v_new,
    pool,
    layer,
    page_tables,
    positions,
    cached_lens,
    new_lens,
    *,
    page_size: int,
    sliding_window: int | None = None,
    implementation: str = "reference",
    tunables: AttentionTunables | None = None,
    prefill_kernel: bool | None = None,
    prefill_tunables: PrefillTunables | None = None,
) -> jax.Array:
    """[B, T, Hq, Dh] attention of the step's queries over the cached pages plus the step's own K/V."""
    if q.ndim != 4 or k_new.ndim != 4 or q.shape[2] % k_new.shape[2]:
        raise ValueError(f"q {q.shape} / k {k_new.shape}: heads must be a multiple of kv heads")
    if k_new.shape != v_new.shape or k_new.shape[:2] != q.shape[:2] or k_new.shape[3] != q.shape[3]:
        raise ValueError(f"k {k_new.shape} / v {v_new.shape} do not match q {q.shape}")
    if pool.ndim != 3 or pool.shape[2] != q.shape[3]:
        raise ValueError(f"pool {pool.shape} must be [L, U, Dh] with Dh = {q.shape[3]}")
    if pool.shape[1] % (page_size * 2 * k_new.shape[2]):
        raise ValueError(
            f"pool units {pool.shape[1]} are not whole pages of {page_size * 2 * k_new.shape[2]}"
        )
    b = q.shape[0]
    if (
        page_tables.shape[0] != b
        or positions.shape != q.shape[:2]
        or cached_lens.shape != (b,)
        or new_lens.shape != (b,)
    ):
        raise ValueError("page_tables, positions, cached_lens and new_lens must match q's batch")
    path = resolve(implementation)
    args = (q, k_new, v_new, pool, layer, page_tables, positions, cached_lens, new_lens)
    window = dict(page_size=page_size, sliding_window=sliding_window)
    if (
        path != "reference"
        and q.shape[1] != 1
        and (PREFILL_KERNEL[path] if prefill_kernel is None else prefill_kernel)
    ):
        group = q.shape[2] // k_new.shape[2]
        return paged_prefill_attention_kernel(
            *args,
            **window,
            tunables=prefill_tunables or prefill_tunables_for(page_size, q.shape[3], group),
            interpret=path == "interpret",
        )
    if cpu_kernels(implementation) and attention_supported(q, pool):
        return cpu_paged_attention(*args, **window).astype(q.dtype)
    if path == "reference" or q.shape[1] != 1:
        return paged_attention_reference(*args, **window)
    out = paged_decode_attention_kernel(
        q[:, 0],
        k_new[:, 0],
        v_new[:, 0],
        pool,
        layer,
        page_tables,
        positions[:, 0],
        cached_lens,
        **window,
        tunables=tunables or tunables_for(page_size, q.shape[3]),
        interpret=path == "interpret",
    )
    return out[:, None]


def _check_rows(q, out, *batches: tuple[int, tuple[int, int]]) -> None:
    """Each batch (row_start, (B, T)) within q's rows; out, if given, q's shape."""
    for row_start, (b, t) in batches:
        if row_start < 0 or row_start + b * t > q.shape[0]:
            raise ValueError(f"rows [{row_start}, {row_start + b * t}) are not within q's {q.shape[0]} rows")
    if out is not None and out.shape != q.shape:
        raise ValueError(f"out {out.shape} must be q's shape {q.shape}")


def paged_attention_rows(
    q,
    k_new,
    v_new,
    pool,
    layer,
    page_tables,
    positions,
    cached_lens,
    new_lens,
    out=None,
    *,
    row_start: int,
    page_size: int,
    sliding_window: int | None = None,
    implementation: str = "reference",
    prefill_kernel: bool | None = None,
) -> jax.Array:
    """paged_attention of a [B, T] batch whose tokens are rows [row_start, row_start + B*T) of the
    step's q, k_new, v_new ([N, H, Dh]: a mixed step's decode rows and prefill chunks side by side),
    written into those rows of out ([N, Hq, Dh]; its other rows kept) or of a new array (its other rows
    unspecified). The Pallas kernels read and write the rows in place: no slices of q/k/v and no join
    of the batches' outputs. Other paths slice, attend and write the rows."""
    if q.ndim != 3 or k_new.ndim != 3 or k_new.shape != v_new.shape or q.shape[0] != k_new.shape[0]:
        raise ValueError(f"q {q.shape}, k {k_new.shape}, v {v_new.shape} must be [N, H, Dh] with one N")
    b, t = positions.shape
    _check_rows(q, out, (row_start, positions.shape))
    path = resolve(implementation)
    window = dict(page_size=page_size, sliding_window=sliding_window)
    group = q.shape[1] // k_new.shape[1]
    interpret = path == "interpret"
    if path != "reference" and t == 1:  # ("cpu" resolves to "reference")
        return paged_decode_attention_kernel(
            q,
            k_new,
            v_new,
            pool,
            layer,
            page_tables,
            positions[:, 0],
            cached_lens,
            **window,
            tunables=tunables_for(page_size, q.shape[2]),
            interpret=interpret,
            row_start=row_start,
            out=out,
        )
    if path != "reference" and (PREFILL_KERNEL[path] if prefill_kernel is None else prefill_kernel):
        tunables = prefill_tunables_for(page_size, q.shape[2], group)
        if prefill_direct(t, group, tunables):
            return paged_prefill_attention_rows(
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
                row_start=row_start,
                **window,
                tunables=tunables,
                interpret=interpret,
            )
    rows = slice(row_start, row_start + b * t)

    def batch(x):
        return x[rows].reshape(b, t, *x.shape[1:])

    res = paged_attention(
        batch(q),
        batch(k_new),
        batch(v_new),
        pool,
        layer,
        page_tables,
        positions,
        cached_lens,
        new_lens,
        **window,
        implementation=implementation,
        prefill_kernel=prefill_kernel,
    )
    base = out if out is not None else jnp.zeros(q.shape, q.dtype)
    return base.at[rows].set(res.reshape(b * t, *q.shape[1:]).astype(q.dtype))


def paged_attention_mixed_rows(
    q,
    k_new,
    v_new,
    pool,
    layer,
    decode: tuple,
    prefill: tuple,
    out=None,
    *,
    decode_row_start: int,
    prefill_row_start: int,
    page_size: int,
    sliding_window: int | None = None,
    implementation: str = "reference",
    prefill_kernel: bool | None = None,
) -> jax.Array:
    """paged_attention_rows of a mixed step's two batches: decode = (page_tables, positions [B, 1],
    cached_lens, new_lens) of rows decode_row_start .., prefill = the same of [B, T] chunks from
    prefill_row_start. One launch for both where the chunk's tunables ask for it
    (PrefillTunables.mixed_launch) and both batches take their tensor-core kernels in place; else each
    batch's own."""
    window = dict(page_size=page_size, sliding_window=sliding_window)
    rows = dict(implementation=implementation, prefill_kernel=prefill_kernel, **window)
    path = resolve(implementation)
    t_dec, t = decode[1].shape[1], prefill[1].shape[1]
    group = q.shape[1] // k_new.shape[1]
    dec_t = tunables_for(page_size, q.shape[2])
    pre_t = prefill_tunables_for(page_size, q.shape[2], group)
    on = PREFILL_KERNEL.get(path, False) if prefill_kernel is None else prefill_kernel
    if (
        path == "reference"
        or t_dec != 1
        or not on
        or not prefill_direct(t, group, pre_t)
        or not mixed_attention_supported(dec_t, pre_t)
    ):
        out = paged_attention_rows(
            q, k_new, v_new, pool, layer, *decode, out, row_start=decode_row_start, **rows
        )
        return paged_attention_rows(
            q, k_new, v_new, pool, layer, *prefill, out, row_start=prefill_row_start, **rows
        )
    _check_rows(q, out, (decode_row_start, decode[1].shape), (prefill_row_start, prefill[1].shape))
    return paged_attention_mixed_kernel(
        q,
        k_new,
        v_new,
        pool,
        layer,
        (decode[0], decode[1][:, 0], decode[2]),
        prefill,
        out,
        **window,
        decode_tunables=dec_t,
        prefill_tunables=pre_t,
        decode_row_start=decode_row_start,
        prefill_row_start=prefill_row_start,
        interpret=path == "interpret",
    )
