"""The decoder over the unified paged pool: forward_paged(params, pool, batch, lora) -> (pool, logits).

The pool is the scan carry, so K/V writes land in place; LoRA rows are read straight from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig
from jlora.metadata import DecodeLora, PagedBatch, PrefillLora
from jlora.model.llama import DecoderLayer, take_logits
from pallas_kernels.lora import lora_decode, lora_prefill
from pallas_kernels.paged_attention import paged_attention, write_kv


def forward_paged(
    params: dict[str, Any],
    pool: jax.Array,  # [L, U, Dh]
    batch: PagedBatch,
    lora: dict[str, DecodeLora] | dict[str, PrefillLora] | None,
    *,
    config: ModelConfig,
    page_size: int,
    impl: str = "reference",
) -> tuple[jax.Array, jax.Array]:  # pool, logits [B, V] float32
    layer_module = DecoderLayer(config, params["embed"].dtype)
    h = jnp.take(params["embed"], batch.tokens, axis=0)  # [B, T, D]
    shapes = config.module_shapes()

    def body(carry, xs):
        h, pool = carry
        layer_params, layer = xs

        def attend(q, k, v, pool):
            pool = write_kv(pool, layer, k, v, batch.write_units, implementation=impl)
            out = paged_attention(
                q, pool, layer, batch.page_tables, batch.positions, batch.context_lens,
                page_size=page_size, num_kv_heads=config.num_key_value_heads,
                sliding_window=config.sliding_window, implementation=impl,
            )
            return out.reshape(*out.shape[:2], -1), pool

        lora_fn = None
        if lora is not None:
            adapters_pool = pool  # adapter pages are not touched by this step's K/V writes

            def lora_fn(name, x):
                meta = lora.get(name)
                if meta is None:
                    return None
                h_out = shapes[name][1]
                if isinstance(meta, DecodeLora):
                    b, t, h_in = x.shape
                    delta = lora_decode(x.reshape(b * t, h_in), adapters_pool, layer, meta.token_index,
                                        meta.a_start, meta.b_start, h_out, implementation=impl)
                    return delta.reshape(b, t, h_out)
                return lora_prefill(x, adapters_pool, layer, meta.a_start, meta.b_start, h_out, implementation=impl)

        h, pool = layer_module.apply({"params": layer_params}, h, batch.positions, pool, attend, lora_fn)
        return (h, pool), None

    layers = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
    (h, pool), _ = jax.lax.scan(body, (h, pool), (params["layers"], layers))
    return pool, take_logits(params, config, h, batch.logits_at)
