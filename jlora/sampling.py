"""Pure jnp sampling: greedy, temperature, top-k, top-p, seeded per request and per step.

The cost is paid only when used: an all-greedy batch skips the random draw, and the sort over the
vocabulary runs only when some row asks for top-k or top-p.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplingArrays:
    """Per-row sampling settings for one step (rows beyond the real batch are padding)."""

    temperature: jax.Array  # [B] float32; 0 means greedy
    top_k: jax.Array  # [B] int32; <= 0 means no limit
    top_p: jax.Array  # [B] float32 in (0, 1]
    keys: jax.Array  # [B, 2] uint32 PRNG key of each row for this step


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside each row's top-k and top-p set to -inf. scaled: [B, V]."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [B]
    rank = jnp.arange(vocab)[None, :]
    in_k = rank < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & (before < top_p[:, None])
    # the smallest kept logit of each row is its threshold (ties at the threshold are kept)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _draw(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    needs_filter = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1.0)))
    scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, k, p: x, scaled, s.top_k, s.top_p)
    return jax.vmap(jax.random.categorical)(s.keys, scaled).astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (tokens [B] int32, log-prob of each chosen token [B], before temperature)."""
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    drawn = jax.lax.cond(jnp.any(s.temperature > 0), _draw, lambda lg, s: greedy, logits, s)
    tokens = jnp.where(s.temperature > 0, drawn, greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
