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
