"""Hugging Face-named tensors -> jlora's stacked parameter tree (and the shapes it must have)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jlora.config import ModelConfig
from jlora.errors import ModelLoadError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)?\.?(\w+)\.(weight|bias)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def layer_param_shapes(config: ModelConfig) -> dict[tuple[str, str], tuple[int, ...]]:
    """(module, leaf) -> per-layer shape, in Flax layout (Dense kernels are [in, out])."""
    shapes: dict[tuple[str, str], tuple[int, ...]] = {
        ("input_layernorm", "weight"): (config.hidden_size,),
        ("post_attention_layernorm", "weight"): (config.hidden_size,),
    }
    for name, (h_in, h_out) in config.module_shapes().items():
        shapes[(name, "kernel")] = (h_in, h_out)
        if config.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
            shapes[(name, "bias")] = (h_out,)
    return shapes


def params_from_tensors(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype: Any,
    total: int | None = None,
    progress: bool = True,
    place: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build the parameter tree; every expected tensor must appear exactly once with its shape.
    place: puts the host tree on devices (jlora.sharding.shard_params for a mesh: each device receives
    only its shard); default: the default device."""
    n_layers = config.num_hidden_layers
    shapes = layer_param_shapes(config)
    stacked = {key: np.zeros((n_layers, *shape), np.float32) for key, shape in shapes.items()}
    seen: set[tuple[str, str, int]] = set()
    top: dict[str, np.ndarray] = {}
    for name, array in tqdm(
        tensors, total=total, desc="loading weights", disable=not progress, unit="tensor"
    ):
        if _IGNORED.search(name):
            continue
        match = _LAYER.match(name)
        if match:
            index, module, leaf = int(match.group(1)), match.group(3), match.group(4)
            key = (module, "kernel" if leaf == "weight" and module.endswith("proj") else leaf)
            if key not in shapes or index >= n_layers:
                raise ModelLoadError(f"unexpected tensor {name}")
            value = array.T if key[1] == "kernel" else array
            if value.shape != shapes[key]:
                raise ModelLoadError(f"{name}: shape {array.shape} does not fit the config ({shapes[key]})")
            stacked[key][index] = value
            seen.add((*key, index))
        elif name == "model.embed_tokens.weight":
            top["embed"] = array
        elif name == "model.norm.weight":
            top["norm"] = array
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                top["lm_head"] = array.T
        else:
            raise ModelLoadError(f"unexpected tensor {name}")

    missing = [
        f"{m}.{leaf}[{i}]" for (m, leaf) in shapes for i in range(n_layers) if (m, leaf, i) not in seen
    ]
    needed = ["embed", "norm"] + ([] if config.tie_word_embeddings else ["lm_head"])
    missing += [k for k in needed if k not in top]
    if missing:
        raise ModelLoadError(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if top["embed"].shape != (config.vocab_size, config.hidden_size):
        raise ModelLoadError(f"embedding shape {top['embed'].shape} does not fit the config")

    layers: dict[str, dict[str, Any]] = {}
    for (module, leaf), value in stacked.items():
        layers.setdefault(module, {})[leaf] = np.asarray(value, dtype)
    host = {"layers": layers, **{k: np.asarray(v, dtype) for k, v in top.items()}}
    return place(host) if place is not None else jax.tree.map(jnp.asarray, host)
