"""Per-step device metadata as registered dataclass pytrees (a shape comment on every field)."""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class KVCache:
    """Contiguous KV cache of the reference path."""

    k: jax.Array  # [L, B, S, Hkv, Dh]
    v: jax.Array  # [L, B, S, Hkv, Dh]


@flax.struct.dataclass
class ContiguousBatch:
    """One step of the reference path: every sequence writes its tokens at their positions."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32; >= S marks padding


@flax.struct.dataclass
class PagedBatch:
    """One step of the paged engine: B sequences, T tokens each (a decode has T = 1)."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32
    write_units: jax.Array  # [B, T] int32 pool unit of each token's K; >= U for padding (dropped)
    page_tables: jax.Array  # [B, P] int32; unused entries 0 (the zero page)
    cached_lens: jax.Array  # [B] int32 tokens in the cache before this step
    new_lens: jax.Array  # [B] int32 real tokens this step (0 for padding rows)
    logits_at: jax.Array  # [B] int32 index into T of the token whose logits are sampled


@flax.struct.dataclass
class DecodeLora:
    """BGMV metadata of one projection: one pair per (token, rank row)."""

    token_index: jax.Array  # [K] int32 flat token index b*T + t, nondecreasing; padding pairs: B*T
    a_start: jax.Array  # [K] int32 first pool unit of the A^T row; 0 for padding
    b_start: jax.Array  # [K] int32 first pool unit of the B row
    offsets: jax.Array  # [B*T + 1] int32 token n's pairs are offsets[n] .. offsets[n + 1]


@flax.struct.dataclass
class DecodeGroup:
    """One BGMV shrink and one expand launch for projections that read the same input (q/k/v;
    gate/up), in place of their DecodeLora: the members' pairs one after another, K each, in `modules`
    order (member i's are [i*K, (i+1)*K)), and their offsets one after another, N + 1 each."""

    token_index: jax.Array  # [G*K] int32
    a_start: jax.Array  # [G*K] int32
    b_start: jax.Array  # [G*K] int32
    offsets: jax.Array  # [G*(N+1)] int32, each member's into its own K
    modules: tuple[str, ...] = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class PrefillLora:
    """SGMV metadata of one projection: each sequence's adapter rows, padded to the rank bucket R."""

    a_start: jax.Array  # [B, R] int32; 0 (zero page) for padding rows
    b_start: jax.Array  # [B, R] int32


@flax.struct.dataclass
class PrefillGroup:
    """One SGMV shrink and one expand launch for projections that read the same input (q/k/v;
    gate/up), in place of their PrefillLora: member i's rows (padded to `rank`) at columns
    [i*rank, (i+1)*rank), the columns past G*rank padding (pallas_kernels.lora.prefill_group_width)."""

    a_start: jax.Array  # [B, RG] int32; 0 (zero page) for padding
    b_start: jax.Array  # [B, RG] int32
    modules: tuple[str, ...] = flax.struct.field(pytree_node=False)
    rank: int = flax.struct.field(pytree_node=False)
