"""Test helpers: tiny random HF models, and log-softmax of the same tokens through jlora and HF."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.metadata import ContiguousBatch
from jlora.model.llama import forward, init_cache


def jlora_logsoftmax(params, config, ids: list[int]) -> np.ndarray:
    """[T, V] float64 log-softmax of every position of one prompt through jlora's forward."""
    cache = init_cache(config, 1, max(64, len(ids)), params["embed"].dtype)
    batch = ContiguousBatch(jnp.asarray([ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32)[None])
    _, logits = jax.jit(lambda p, c, b: forward(p, c, b, config=config))(params, cache, batch)
    return np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1), np.float64)


def hf_logsoftmax(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def tiny_hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model of the given family, float32."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random init is ~N(0, 0.02): make it larger so differences show
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.shape[0] == common[
                    "hidden_size"
                ] else p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.08)
    return model.eval()
