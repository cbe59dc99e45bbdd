"""Pure jnp sampling: greedy, temperature, top-k, top-p, seeded per request and per step."""

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


def _sample_row(logits: jax.Array, temperature, top_k, top_p, key) -> jax.Array:
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)  # descending
    sorted_logits = scaled[order]
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    cumulative_before = jnp.cumsum(probs) - probs
    keep = keep & (cumulative_before < top_p)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice]


def sample(logits: jax.Array, s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (tokens [B] int32, log-prob of each chosen token [B], before temperature)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.vmap(_sample_row)(logits.astype(jnp.float32), s.temperature, s.top_k, s.top_p, s.keys)
    tokens = jnp.where(s.temperature > 0, sampled, greedy).astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
