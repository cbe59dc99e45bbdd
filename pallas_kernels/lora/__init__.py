"""Gathered LoRA shrink+expand. Public functions validate shapes early, then pick kernel or reference.

- lora_rows: rows in per-module pools (the reference generate path).
- lora_decode: BGMV, one adapter per token, rows read straight from the unified paged pool.
- lora_prefill: SGMV, one adapter per sequence chunk, rows read straight from the unified pool.
- lora_decode_group_add / lora_prefill_group_add: the same deltas added into the rows of a larger
  output that one batch of a mixed step owns (the kernels read x and write y at a row offset, in place).
- lora_mixed_group_add: both of a mixed step's batches (decode rows, prompt chunks) at once: one shrink
  and one expand launch for the two where LoraTunables.mixed_launch says so (mixed_kernel.py).

`implementation` is one of pallas_kernels.backend.IMPLEMENTATIONS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import cpu_kernels, resolve
from pallas_kernels.cpu import bgmv_group, lora_supported, sgmv
from pallas_kernels.lora.grouped_kernel import by_adapter_supported
from pallas_kernels.lora.kernel import (
    bgmv_shrink,
    expand_kernel,
    lora_decode_kernel,
    lora_prefill_kernel,
    sgmv_rows,
    sgmv_supported,
)
from pallas_kernels.lora.mixed_kernel import bgmv_sgmv_rows_add
from pallas_kernels.lora.reference import (
    lora_decode_expand_reference,
    lora_decode_reference,
    lora_decode_shrink_reference,
    lora_prefill_reference,
    lora_rows_reference,
)
from pallas_kernels.lora.shapes import LoraTunables, tunables_for

__all__ = [
    "LoraTunables",
    "decode_offsets",
    "lora_decode",
    "lora_decode_expand_group",
    "lora_decode_group",
    "lora_decode_group_add",
    "lora_decode_shrink",
    "lora_mixed_group_add",
    "mixed_supported",
    "lora_decode_reference",
    "lora_prefill",
    "lora_prefill_group",
    "lora_prefill_group_add",
    "prefill_group_width",
    "lora_prefill_reference",
    "lora_rows",
    "lora_rows_reference",
]


def lora_rows(x, a_pool, b_pool, token_index, row_index, *, implementation: str = "reference") -> jax.Array:
    """The LoRA delta of every token (see reference.py for the layout). Shapes are checked here."""
    if x.ndim != 2 or a_pool.ndim != 2 or b_pool.ndim != 2:
        raise ValueError(f"x, a_pool, b_pool must be 2-D; got {x.shape}, {a_pool.shape}, {b_pool.shape}")
    if a_pool.shape[1] != x.shape[1]:
        raise ValueError(f"a_pool width {a_pool.shape[1]} != x width {x.shape[1]}")
    if a_pool.shape[0] != b_pool.shape[0]:
        raise ValueError(f"a_pool rows {a_pool.shape[0]} != b_pool rows {b_pool.shape[0]}")
    if token_index.shape != row_index.shape or token_index.ndim != 1:
        raise ValueError(f"token_index {token_index.shape} and row_index {row_index.shape} must be equal 1-D")
    resolve(implementation)  # the row-pool path has only the reference
    return lora_rows_reference(x, a_pool, b_pool, token_index, row_index)


def decode_offsets(token_index: jax.Array, n_tokens: int) -> jax.Array:
    """[N + 1] start of each token's pairs in a nondecreasing token_index (padding pairs: N)."""
    return jnp.searchsorted(token_index, jnp.arange(n_tokens + 1, dtype=token_index.dtype)).astype(jnp.int32)


def _check_widths(h_in: int, h_out: int, dh: int) -> None:
    if h_in % dh or h_out % dh:
        raise ValueError(f"widths {h_in} -> {h_out} must be multiples of the pool's head_dim {dh}")


def _check_decode_pairs(x, pool, token_index, a_start, b_start) -> None:
    if x.ndim != 2 or pool.ndim != 3:
        raise ValueError(f"x must be [N, H_in] and pool [L, U, Dh]; got {x.shape}, {pool.shape}")
    if not (token_index.shape == a_start.shape == b_start.shape) or token_index.ndim != 1:
        raise ValueError("token_index, a_start, b_start must be equal 1-D arrays")


def lora_decode(
    x,
    pool,
    layer,
    token_index,
    a_start,
    b_start,
    h_out: int,
    offsets=None,
    *,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
    max_rank: int = 16,
) -> jax.Array:
    """BGMV delta [N, H_out]. Pairs must be grouped by token (nondecreasing token_index), padding
    pairs last with token_index N and a_start 0. offsets ([N + 1]) may be given to skip a search.
    max_rank: the largest rank expected per token (a tile size; larger ranks are still correct)."""
    _check_decode_pairs(x, pool, token_index, a_start, b_start)
    if offsets is not None and offsets.shape != (x.shape[0] + 1,):
        raise ValueError(f"offsets {offsets.shape} must be [N + 1] = [{x.shape[0] + 1}]")
    _check_widths(x.shape[1], h_out, pool.shape[2])
    path = resolve(implementation)
    if path == "reference" and not (cpu_kernels(implementation) and lora_supported(x, pool)):
        return lora_decode_reference(x, pool, layer, token_index, a_start, b_start, h_out)
    if offsets is None:
        offsets = decode_offsets(token_index, x.shape[0])
    return lora_decode_group(  # one projection: a group of one
        x,
        pool,
        layer,
        token_index,
        a_start,
        b_start,
        offsets,
        (h_out,),
        implementation=implementation,
        tunables=tunables,
        max_rank=max_rank,
    )


def lora_decode_shrink(
    x,
    pool,
    layer,
    token_index,
    a_start,
    *,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
) -> jax.Array:
    """BGMV shrink alone: [K] float32, x[token] . A row per pair. Projections that read the same x
    (q/k/v, gate/up) list their pairs one after another and share one launch, then one expand
    (lora_decode_expand_group)."""
    if x.ndim != 2 or pool.ndim != 3:
        raise ValueError(f"x must be [N, H_in] and pool [L, U, Dh]; got {x.shape}, {pool.shape}")
    if token_index.shape != a_start.shape or token_index.ndim != 1:
        raise ValueError("token_index and a_start must be equal 1-D arrays")
    _check_widths(x.shape[1], pool.shape[2], pool.shape[2])
    path = resolve(implementation)
    if path == "reference":
        return lora_decode_shrink_reference(x, pool, layer, token_index, a_start)
    return bgmv_shrink(
        x,
        pool,
        layer,
        token_index,
        a_start,
        tunables=tunables or tunables_for(pool.shape[2], x.shape[0]),
        interpret=path == "interpret",
    )


def lora_decode_expand_group(
    shrunk,
    pool,
    layer,
    token_index,
    b_start,
    offsets,
    h_outs: tuple[int, ...],
    dtype,
    *,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
    max_rank: int = 16,
) -> jax.Array:
    """BGMV expand of G projections in one launch: [N, sum(h_outs)], their deltas side by side.
    shrunk, token_index, b_start: [G*K] (projection m's pairs are the m-th K, each grouped by token);
    offsets: [G*(N+1)], projection m's offsets into its own K."""
    g = len(h_outs)
    if not (shrunk.shape == token_index.shape == b_start.shape) or shrunk.ndim != 1 or shrunk.shape[0] % g:
        raise ValueError(
            f"shrunk {shrunk.shape}, token_index {token_index.shape}, b_start {b_start.shape} "
            f"must be equal [G*K] with G = {g}"
        )
    if offsets.ndim != 1 or offsets.shape[0] % g:
        raise ValueError(f"offsets {offsets.shape} must be [G*(N+1)] with G = {g}")
    for h in h_outs:
        _check_widths(pool.shape[2], h, pool.shape[2])
    path = resolve(implementation)
    if path == "reference":
        k, n = shrunk.shape[0] // g, offsets.shape[0] // g - 1
        return jnp.concatenate(
            [
                lora_decode_expand_reference(
                    shrunk[i * k : (i + 1) * k],
                    pool,
                    layer,
                    token_index[i * k : (i + 1) * k],
                    b_start[i * k : (i + 1) * k],
                    h,
                    n,
                    dtype,
                )
                for i, h in enumerate(h_outs)
            ],
            axis=1,
        )
    tunables = tunables or tunables_for(pool.shape[2], offsets.shape[0] // g - 1)
    return expand_kernel(tunables)(
        shrunk,
        pool,
        layer,
        b_start,
        offsets,
        h_outs=tuple(h_outs),
        dtype=jnp.dtype(dtype),
        tunables=tunables,
        max_rank=max_rank,
        interpret=path == "interpret",
    )


def lora_decode_group(
    x,
    pool,
    layer,
    token_index,
    a_start,
    b_start,
    offsets,
    h_outs: tuple[int, ...],
    *,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
    max_rank: int = 16,
) -> jax.Array:
    """BGMV deltas of G projections that read the same x (q/k/v, gate/up): [N, sum(h_outs)] in
    x.dtype, side by side. token_index, a_start, b_start: [G*K], projection m's pairs the m-th K,
    each grouped by token; offsets: [G*(N+1)], projection m's offsets into its own K. Batches of at
    most tunables.fused_max_tokens tokens take one launch (bgmv_fused), larger ones a shared shrink
    and a shared expand."""
    _check_decode_group(x.shape[0], x, pool, token_index, a_start, b_start, offsets, h_outs)
    path = resolve(implementation)
    if cpu_kernels(implementation) and lora_supported(x, pool):
        return bgmv_group(x, pool, layer, a_start, b_start, offsets, tuple(h_outs)).astype(x.dtype)
    if path == "reference":
        s = lora_decode_shrink_reference(x, pool, layer, token_index, a_start)
        return lora_decode_expand_group(
            s, pool, layer, token_index, b_start, offsets, h_outs, x.dtype, implementation="reference"
        )
    pairs = (token_index, a_start, b_start, offsets)
    return _bgmv(x, pool, layer, pairs, h_outs, x.shape[0], path, tunables, max_rank)


def _check_decode_group(n, x, pool, token_index, a_start, b_start, offsets, h_outs) -> None:
    """The pairs of G projections over n tokens of x: [G*K] each, offsets [G*(n+1)]."""
    g = len(h_outs)
    _check_decode_pairs(x, pool, token_index, a_start, b_start)
    if token_index.shape[0] % g or offsets.shape != (g * (n + 1),):
        raise ValueError(
            f"pairs {token_index.shape} must be [G*K] and offsets {offsets.shape} [G*(N+1)] with G = {g}"
        )
    for h in h_outs:
        _check_widths(x.shape[1], h, pool.shape[2])


def _bgmv(x, pool, layer, pairs, h_outs, n, path, tunables, max_rank, y=None, row_start: int = 0):
    """The Pallas BGMV of n tokens (rows row_start .. of x): their deltas, or y with them added."""
    return lora_decode_kernel(
        x,
        pool,
        layer,
        *pairs,
        h_outs=tuple(h_outs),
        tunables=tunables or tunables_for(pool.shape[2], n),
        max_rank=max_rank,
        interpret=path == "interpret",
        y=y,
        row_start=row_start,
    )


def lora_prefill(
    x,
    pool,
    layer,
    a_start,
    b_start,
    h_out: int,
    *,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
) -> jax.Array:
    """SGMV delta [B, T, H_out]: each sequence's chunk uses one adapter, rows padded to R with 0."""
    if a_start.shape != b_start.shape or a_start.ndim != 2:
        raise ValueError(f"a_start {a_start.shape} / b_start {b_start.shape} must be [B, R]")
    return lora_prefill_group(
        x,
        pool,
        layer,
        a_start,
        b_start,
        (h_out,),
        a_start.shape[1],
        implementation=implementation,
        tunables=tunables,
    )


def prefill_group_width(members: int, rank: int) -> int:
    """Columns of a PrefillGroup's a_start/b_start: the members' rank buckets side by side, padded to a
    power of two (the grouped shrink's tile)."""
    return 1 << (members * rank - 1).bit_length()


def lora_prefill_group(
    x,
    pool,
    layer,
    a_start,
    b_start,
    h_outs: tuple[int, ...],
    rank: int,
    *,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
) -> jax.Array:
    """SGMV deltas of G projections that read the same x (q/k/v, gate/up): [B, T, sum(h_outs)], side by
    side. a_start, b_start: [B, RG] with member m's rows (padded to `rank` with 0, the zero page) at
    columns [m * rank, (m + 1) * rank); RG = prefill_group_width(G, rank) for a group (the columns past
    G * rank are 0), rank for one projection. The Pallas path runs one shrink and one expand launch for
    the whole group."""
    g = len(h_outs)
    if x.ndim != 3 or pool.ndim != 3:
        raise ValueError(f"x must be [B, T, H_in] and pool [L, U, Dh]; got {x.shape}, {pool.shape}")
    width = rank if g == 1 else prefill_group_width(g, rank)
    if a_start.shape != b_start.shape or a_start.shape != (x.shape[0], width):
        raise ValueError(
            f"a_start {a_start.shape} / b_start {b_start.shape} must be [B, {width}] with B = {x.shape[0]} "
            f"({g} projections of rank {rank})"
        )
    for h in h_outs:
        _check_widths(x.shape[2], h, pool.shape[2])
    path = resolve(implementation)
    on_cpu = cpu_kernels(implementation) and lora_supported(x, pool)
    tunables = tunables or tunables_for(pool.shape[2], x.shape[0] * x.shape[1])
    if on_cpu or path == "reference" or not sgmv_supported(x.shape[1], rank, tunables):
        # member by member: the C++ SGMV, or the reference

        def member(i: int, h_out: int) -> jax.Array:
            a, b = a_start[:, i * rank : (i + 1) * rank], b_start[:, i * rank : (i + 1) * rank]
            if on_cpu:
                return sgmv(x, pool, layer, a, b, h_out).astype(x.dtype)
            return lora_prefill_reference(x, pool, layer, a, b, h_out)

        out = [member(i, h) for i, h in enumerate(h_outs)]
        return out[0] if g == 1 else jnp.concatenate(out, axis=-1)
    return lora_prefill_kernel(
        x,
        pool,
        layer,
        a_start,
        b_start,
        h_outs=tuple(h_outs),
        rank=rank,
        tunables=tunables,
        interpret=path == "interpret",
    )


def _check_rows(y, x, row_start: int, n: int, width: int) -> None:
    if x.ndim != 2 or y.ndim != 2 or y.shape != (x.shape[0], width):
        raise ValueError(f"x must be [N, H_in] and y [N, {width}]; got {x.shape}, {y.shape}")
    if row_start < 0 or row_start + n > x.shape[0]:
        raise ValueError(f"rows [{row_start}, {row_start + n}) are not within x's {x.shape[0]} rows")


def lora_decode_group_add(
    y,
    x,
    pool,
    layer,
    token_index,
    a_start,
    b_start,
    offsets,
    h_outs: tuple[int, ...],
    *,
    row_start: int,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
    max_rank: int = 16,
) -> jax.Array:
    """y [N_all, sum(h_outs)] with lora_decode_group's deltas of the N tokens at rows [row_start,
    row_start + N) of x [N_all, H_in] added to the same rows (N from offsets). The Pallas path reads x
    and adds into y in place (no slice of x, no join of deltas); the others slice and add."""
    n = offsets.shape[0] // len(h_outs) - 1
    _check_rows(y, x, row_start, n, sum(h_outs))
    path = resolve(implementation)  # "cpu" resolves to "reference"
    if path == "reference":
        delta = lora_decode_group(
            x[row_start : row_start + n],
            pool,
            layer,
            token_index,
            a_start,
            b_start,
            offsets,
            h_outs,
            implementation=implementation,
            max_rank=max_rank,
        )
        return y.at[row_start : row_start + n].add(delta.astype(y.dtype))
    _check_decode_group(n, x, pool, token_index, a_start, b_start, offsets, h_outs)
    pairs = (token_index, a_start, b_start, offsets)
    return _bgmv(x, pool, layer, pairs, h_outs, n, path, tunables, max_rank, y=y, row_start=row_start)


def lora_prefill_group_add(
    y,
    x,
    pool,
    layer,
    a_start,
    b_start,
    h_outs: tuple[int, ...],
    rank: int,
    *,
    row_start: int,
    seq_len: int,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
) -> jax.Array:
    """y [N_all, sum(h_outs)] with lora_prefill_group's deltas of a [B, seq_len] batch (B from a_start),
    whose tokens are rows [row_start, row_start + B * seq_len) of x [N_all, H_in], added to the same
    rows. The Pallas path reads x and adds into y in place; the others slice and add."""
    bsz = a_start.shape[0]
    n = bsz * seq_len
    _check_rows(y, x, row_start, n, sum(h_outs))
    path = resolve(implementation)  # "cpu" resolves to "reference"
    tunables = tunables or tunables_for(pool.shape[2], n)
    if path == "reference" or not sgmv_supported(seq_len, rank, tunables):
        delta = lora_prefill_group(
            x[row_start : row_start + n].reshape(bsz, seq_len, x.shape[1]),
            pool,
            layer,
            a_start,
            b_start,
            h_outs,
            rank,
            implementation=implementation,
            tunables=tunables,
        )
        return y.at[row_start : row_start + n].add(delta.reshape(n, -1).astype(y.dtype))
    width = rank if len(h_outs) == 1 else prefill_group_width(len(h_outs), rank)
    if a_start.shape != b_start.shape or a_start.shape != (bsz, width):
        raise ValueError(f"a_start {a_start.shape} / b_start {b_start.shape} must be [B, {width}]")
    for h in h_outs:
        _check_widths(x.shape[1], h, pool.shape[2])
    return sgmv_rows(
        x,
        pool,
        layer,
        a_start,
        b_start,
        y,
        h_outs=tuple(h_outs),
        rank=rank,
        tunables=tunables,
        seq_len=seq_len,
        row_start=row_start,
        interpret=path == "interpret",
    )


def mixed_supported(
    n_decode: int, max_rank: int, seq_len: int, rank: int, decode: LoraTunables, prefill: LoraTunables
) -> bool:
    """Whether a mixed step's decode rows and prompt chunks take one shrink and one expand launch: the
    chunk's tier asks for it (prefill.mixed_launch), the chunks would run the SGMV kernels, and the
    decode rows the plain BGMV shrink and Triton expand (not by adapter, not fused, not Mosaic)."""
    by_adapter = 0 < decode.by_adapter_min_rank <= max_rank and by_adapter_supported(max_rank)
    plain_bgmv = not by_adapter and n_decode > decode.fused_max_tokens and decode.expand_backend == "triton"
    return prefill.mixed_launch and plain_bgmv and sgmv_supported(seq_len, rank, prefill)


def lora_mixed_group_add(
    y,
    x,
    pool,
    layer,
    decode: tuple,
    prefill: tuple,
    h_outs: tuple[int, ...],
    *,
    decode_row_start: int,
    prefill_row_start: int,
    max_rank: int,
    rank: int,
    seq_len: int,
    implementation: str = "reference",
    tunables: LoraTunables | None = None,
) -> jax.Array:
    """y [N_all, sum(h_outs)] with both batches of a mixed step added to their rows: decode = (token_index,
    a_start, b_start, offsets) of lora_decode_group_add (rows decode_row_start .. + N), prefill = (a_start,
    b_start) of lora_prefill_group_add (B sequences of seq_len rows from prefill_row_start). One shrink
    and one expand launch for both where mixed_supported, else each batch's own launches. tunables: for
    both batches (None: each batch's tier by its tokens)."""
    g = len(h_outs)
    token_index, a_dec, b_dec, offsets = decode
    a_pre, b_pre = prefill
    n_dec, n_pre = offsets.shape[0] // g - 1, a_pre.shape[0] * seq_len
    dh = pool.shape[2]
    dec_t = tunables or tunables_for(dh, n_dec)
    pre_t = tunables or tunables_for(dh, n_pre)
    path = resolve(implementation)
    if path == "reference" or not mixed_supported(n_dec, max_rank, seq_len, rank, dec_t, pre_t):
        y = lora_decode_group_add(
            y, x, pool, layer, *decode, h_outs, row_start=decode_row_start, implementation=implementation,
            tunables=tunables, max_rank=max_rank,
        )  # fmt: skip
        return lora_prefill_group_add(
            y, x, pool, layer, *prefill, h_outs, rank, row_start=prefill_row_start, seq_len=seq_len,
            implementation=implementation, tunables=tunables,
        )  # fmt: skip
    _check_rows(y, x, decode_row_start, n_dec, sum(h_outs))
    _check_rows(y, x, prefill_row_start, n_pre, sum(h_outs))
    _check_decode_group(n_dec, x, pool, token_index, a_dec, b_dec, offsets, h_outs)
    width = rank if g == 1 else prefill_group_width(g, rank)
    if a_pre.shape != b_pre.shape or a_pre.shape[1] != width:
        raise ValueError(f"a_start {a_pre.shape} / b_start {b_pre.shape} must be [B, {width}]")
    return bgmv_sgmv_rows_add(
        y, x, pool, layer, token_index, a_dec, b_dec, offsets, a_pre, b_pre, h_outs=tuple(h_outs),
        max_rank=max_rank, rank=rank, seq_len=seq_len, decode_row_start=decode_row_start,
        prefill_row_start=prefill_row_start, decode_tunables=dec_t, prefill_tunables=pre_t,
        interpret=path == "interpret",
    )  # fmt: skip
