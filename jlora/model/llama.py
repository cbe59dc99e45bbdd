"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) with explicit state.

forward(params, cache, batch) -> (cache, logits). Layers are stacked on a leading axis and run
under lax.scan, so compile time does not grow with depth. The decoder layer does not know how K/V
are stored: it calls `attend(q, k, v, state) -> (out, state)`; LoRA enters through
`lora_fn(modules, x, y, state) -> y` (y, the projections' joined output, with the LoRA deltas of
projections that read x added to their columns). The contiguous cache (reference path) and the paged
pool both plug in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.config import SHARED_INPUT_MODULES, ModelConfig
from jlora.metadata import ContiguousBatch, KVCache
from jlora.model.attention import contiguous_attention
from jlora.model.layers import Linear, RMSNorm, apply_rope, rms_norm, rope_inverse_frequencies
from jlora.model.lora import LoraPairs, LoraWeights, lora_delta
from pallas_kernels.cpu import panel_matmul

LoraState = tuple[dict[str, LoraWeights], dict[str, LoraPairs]]
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# (modules, x, y, current attention state) -> y with the modules' LoRA deltas added to their columns
# (y: the modules' outputs side by side, read from x)
LoraFn = Callable[[tuple[str, ...], jax.Array, jax.Array, Any], jax.Array]
Store = Callable[[jax.Array, jax.Array, Any], Any]  # (k, v, attention state) -> attention state
QKV, GATE_UP = SHARED_INPUT_MODULES  # the fused projections' members


class DecoderLayer(nn.Module):
    """One pre-norm block: attention with GQA and rope, then a SwiGLU MLP. LoRA adds to any projection."""

    config: ModelConfig
    dtype: Any = jnp.float32
    # q/k/v as one "qkv_proj" and gate/up as one "gate_up_proj" matmul (jlora.model.paged.fuse_layer):
    # fewer, larger launches; each member's LoRA delta is added to its own columns
    fused: bool = False
    # the norms (parameter names) whose scaled output, with LoRA, is materialised once (an optimisation
    # barrier) for the matmul and the LoRA kernels to read: XLA's GPU compiler otherwise folds the norm's
    # weight into the GEMM's prologue and scales it again in a launch of its own for the LoRA kernels
    materialize_norms: tuple[str, ...] = ()

    def _proj_fused(
        self, name, members, x, widths, bias: bool, lora_fn: LoraFn | None, state: Any, residual=None
    ) -> list[jax.Array]:
        """One matmul over the members' joined weights (plus `residual`, if given, before any LoRA
        delta: XLA can take the add into the GEMM, and a LoRA kernel that adds in place then leaves no
        add of its own), each member's LoRA delta added to its own columns; the members' outputs."""
        y = Linear(sum(widths), use_bias=bias, name=name, dtype=self.dtype)(x)
        if residual is not None:
            y = y + residual
        if lora_fn is not None:
            y = lora_fn(tuple(members), x, y, state)
        return jnp.split(y, list(itertools.accumulate(widths[:-1])), axis=-1)

    def _proj(
        self, name, x, features: int, bias: bool, lora_fn: LoraFn | None, state: Any, residual=None
    ) -> jax.Array:
        return self._proj_fused(name, (name,), x, (features,), bias, lora_fn, state, residual)[0]

    def _norm(self, name: str, h: jax.Array, lora_fn: LoraFn | None) -> jax.Array:
        x = RMSNorm(self.config.rms_norm_eps, self.dtype, name=name)(h)
        return (
            jax.lax.optimization_barrier(x) if name in self.materialize_norms and lora_fn is not None else x
        )

    def _residual_proj(self, h, name, x, lora_fn: LoraFn | None, state: Any, reduce) -> jax.Array:
        """h plus a row-split projection of x (o, down). On one device the matmul takes h as its
        residual; under tensor parallelism the shards' partial outputs (and LoRA deltas) are reduced
        first, then h is added."""
        if reduce is None:
            return self._proj(name, x, self.config.hidden_size, False, lora_fn, state, residual=h)
        return h + reduce(self._proj(name, x, self.config.hidden_size, False, lora_fn, state))

    @nn.compact
    def __call__(
        self,
        h,
        positions,
        attn_state,
        attend: Attend,
        lora_fn: LoraFn | None = None,
        reduce: Callable[[jax.Array], jax.Array] | None = None,
        store: Store | None = None,
    ):
        # h [B, T, D]; positions [B, T]. reduce: the all-reduce of row-split layers' partial outputs
        # (tensor parallelism); their LoRA deltas are partial too and ride the same all-reduce.
        # store(k, v, state) -> state, if given, stores the new K/V before the query is projected, so
        # that every later read of the state (q's LoRA, attention, o's LoRA) sees it as written.
        c = self.config
        b, t, _ = h.shape
        x = self._norm("input_layernorm", h, lora_fn)
        bias = c.attention_bias
        inv_freq = rope_inverse_frequencies(c)
        if self.fused:
            q, k, v = self._proj_fused(
                "qkv_proj", QKV, x, (c.q_dim, c.kv_dim, c.kv_dim), bias, lora_fn, attn_state
            )
        else:
            k = self._proj("k_proj", x, c.kv_dim, bias, lora_fn, attn_state)
            v = self._proj("v_proj", x, c.kv_dim, bias, lora_fn, attn_state)
        k = apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), positions, inv_freq)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if store is not None:
            attn_state = store(k, v, attn_state)
        if not self.fused:
            q = self._proj("q_proj", x, c.q_dim, bias, lora_fn, attn_state)
        q = apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), positions, inv_freq)
        attn, attn_state = attend(q, k, v, attn_state)
        # LoRA after attention reads the state as updated (adapter rows are untouched by K/V writes),
        # so the pool is never needed in two versions and is updated in place
        h = self._residual_proj(h, "o_proj", attn, lora_fn, attn_state, reduce)

        x = self._norm("post_attention_layernorm", h, lora_fn)
        if self.fused:
            size = c.intermediate_size
            gate, up = self._proj_fused("gate_up_proj", GATE_UP, x, (size, size), False, lora_fn, attn_state)
        else:
            gate = self._proj("gate_proj", x, c.intermediate_size, False, lora_fn, attn_state)
            up = self._proj("up_proj", x, c.intermediate_size, False, lora_fn, attn_state)
        h = self._residual_proj(h, "down_proj", jax.nn.silu(gate) * up, lora_fn, attn_state, reduce)
        return h, attn_state


def add_deltas(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    """y plus a LoRA delta (None: none), in y's dtype."""
    return y if delta is None else y + delta.astype(y.dtype)


def side_by_side(deltas: list[jax.Array | None], widths: list[int], like: jax.Array) -> jax.Array | None:
    """Projections' deltas [..., w_i] joined on the last axis, zeros where one has none; None if none
    has one. like: an array with the deltas' leading shape and dtype."""
    if all(d is None for d in deltas):
        return None
    if len(deltas) == 1:
        return deltas[0]
    return jnp.concatenate(
        [
            d if d is not None else jnp.zeros((*like.shape[:-1], w), like.dtype)
            for d, w in zip(deltas, widths)
        ],
        axis=-1,
    )


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any) -> KVCache:
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def lm_head(params: dict[str, Any], config: ModelConfig, h: jax.Array) -> jax.Array:
    """Final norm and logits in float32. h: [..., D] -> [..., V]."""
    h = rms_norm(h, params["norm"], config.rms_norm_eps)
    if "lm_head_panels" in params:  # pack_linear_weights: the (tied or own) head as column panels
        return panel_matmul(h.astype(jnp.float32), params["lm_head_panels"], config.vocab_size)
    if config.tie_word_embeddings:
        return jnp.einsum("...D,VD->...V", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...D,DV->...V", h, params["lm_head"], preferred_element_type=jnp.float32)


def take_logits(
    params: dict[str, Any], config: ModelConfig, h: jax.Array, logits_at: jax.Array | None
) -> jax.Array:
    if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
    return lm_head(params, config, h)


def forward(
    params: dict[str, Any],
    cache: KVCache,
    batch: ContiguousBatch,
    *,
    config: ModelConfig,
    lora: LoraState | None = None,
    logits_at: jax.Array | None = None,  # [B] index into T; None: logits for every token
    lora_impl: str = "reference",
) -> tuple[KVCache, jax.Array]:  # cache, logits [B, V] or [B, T, V] (float32)
    """The reference path: a contiguous cache [L, B, S, Hkv, Dh]."""
    layer = DecoderLayer(config, params["embed"].dtype)
    h = jnp.take(params["embed"], batch.tokens, axis=0)  # [B, T, D]
    pairs = lora[1] if lora is not None else None
    shapes = config.module_shapes()

    def attend(q, k, v, state):
        out, ck, cv = contiguous_attention(
            q, k, v, state[0], state[1], batch.positions, config.sliding_window
        )
        return out, (ck, cv)

    def body(h, xs):
        layer_params, ck, cv, layer_lora = xs
        lora_fn = None
        if layer_lora is not None:

            def lora_fn(names, x, y, state):
                deltas = [
                    lora_delta(x, layer_lora[m], pairs[m], lora_impl) if m in layer_lora else None
                    for m in names
                ]
                return add_deltas(y, side_by_side(deltas, [shapes[m][1] for m in names], x))

        h, (ck, cv) = layer.apply({"params": layer_params}, h, batch.positions, (ck, cv), attend, lora_fn)
        return h, (ck, cv)

    lora_weights = lora[0] if lora is not None else None
    h, (k, v) = jax.lax.scan(body, h, (params["layers"], cache.k, cache.v, lora_weights))
    return KVCache(k=k, v=v), take_logits(params, config, h, logits_at)


def random_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Random weights of the right geometry (for benchmarks), created directly in `dtype`."""
    layer = DecoderLayer(config, dtype)
    k_embed, k_head, k_layers = jax.random.split(key, 3)
    d = config.hidden_size
    h0 = jnp.zeros((1, 1, d), dtype)
    pos0 = jnp.zeros((1, 1), jnp.int32)

    def attend(q, k, v, state):
        return q.reshape(*q.shape[:2], -1), state

    def init_one(k):
        return layer.init(k, h0, pos0, None, attend)["params"]

    layers = jax.vmap(init_one)(jax.random.split(k_layers, config.num_hidden_layers))
    params = {
        "embed": (jax.random.normal(k_embed, (config.vocab_size, d), jnp.float32) * 0.02).astype(dtype),
        "layers": layers,
        "norm": jnp.ones((d,), dtype),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = (jax.random.normal(k_head, (d, config.vocab_size), jnp.float32) * 0.02).astype(
            dtype
        )
    return params
