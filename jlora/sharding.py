"""Tensor parallelism on a jax.sharding mesh: logical axis names for every array, one rules table.

Megatron-style: q/k/v and gate/up are split by output columns (attention heads, MLP columns), o and
down by input rows; their partial outputs meet in one all-reduce each, the base layer's own. LoRA is
partitioned like the layer it adapts (S-LoRA section 6): on a column-split layer A is whole and B
split like the output; on a row-split layer A is split like the input and B whole, so its partial
delta joins the base layer's partial sum before that same all-reduce. LoRA adds no collective.
KV pages are split by KV head: every shard holds the same pages with its own heads, and the same
unit indices address every shard's pool (the host keeps one layout, computed per shard).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.config import MeshConfig, ModelConfig

AXES = ("data", "model")

# logical axis -> mesh axis (None: replicated). The one table every sharding decision reads.
RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,  # the hidden size: activations between layers are whole on every shard
    "vocab": "model",  # lm_head columns; logits are gathered (the base layer's collective)
    "embed_vocab": None,  # the embedding table stays whole (a lookup needs no collective)
    "heads": "model",  # q heads (and o_proj rows)
    "kv_heads": "model",
    "mlp": "model",
    "lora_rank": None,
    "pool_units": "model",  # the unified pool: each shard its own KV heads and adapter slices
    "head_dim": None,
    "batch": None,
    "tokens": None,
}

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")

# logical axes of each layer parameter (without the leading "layers" axis)
LAYER_PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("input_layernorm", "weight"): ("embed",),
    ("post_attention_layernorm", "weight"): ("embed",),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
}
TOP_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("embed_vocab", "embed"),
    "norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}
POOL_AXES = ("layers", "pool_units", "head_dim")  # [L, shards * U_local, Dh]


def spec(logical: tuple[str, ...]) -> PartitionSpec:
    return PartitionSpec(*(RULES[a] for a in logical))


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < config.size:
        raise ValueError(
            f"mesh {config.data}x{config.model} needs {config.size} devices; {len(devices)} visible"
        )
    grid = np.asarray(devices[: config.size], dtype=object).reshape(config.data, config.model)
    return Mesh(grid, AXES)


def model_ways(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["model"])


def check_divisible(config: ModelConfig, ways: int) -> None:
    """Heads, KV heads, MLP columns and vocab must split evenly."""
    for name, n in (
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", config.num_key_value_heads),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ):
        if n % ways:
            raise ValueError(f"{name}={n} does not split {ways} ways")


def local_config(config: ModelConfig, ways: int) -> ModelConfig:
    """The geometry one shard computes: its heads, KV heads and MLP columns."""
    if ways == 1:
        return config
    check_divisible(config, ways)
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // ways,
        num_key_value_heads=config.num_key_value_heads // ways,
        intermediate_size=config.intermediate_size // ways,
    )


def local_module_shapes(config: ModelConfig, ways: int) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection on one shard: column-split out, row-split in."""
    out = {}
    for m, (h_in, h_out) in config.module_shapes().items():
        out[m] = (h_in, h_out // ways) if m in COLUMN_PARALLEL else (h_in // ways, h_out)
    return out


def shard_lora_rows(
    module: str, a: np.ndarray, b: np.ndarray, shard: int, ways: int
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's slice of an adapter's rows (A^T rows [..., H_in], B rows [..., H_out])."""
    if ways == 1:
        return a, b
    if module in COLUMN_PARALLEL:
        w = b.shape[-1] // ways
        return a, b[..., shard * w : (shard + 1) * w]
    w = a.shape[-1] // ways
    return a[..., shard * w : (shard + 1) * w], b


def param_specs(params: dict[str, Any]) -> dict[str, Any]:
    """A PartitionSpec for every parameter (stacked layers or a list of per-layer trees)."""

    def layer_specs(tree: dict[str, Any], stacked: bool) -> dict[str, Any]:
        lead = ("layers",) if stacked else ()
        return {
            m: {leaf: spec(lead + LAYER_PARAM_AXES[(m, leaf)]) for leaf in leaves}
            for m, leaves in tree.items()
        }

    out: dict[str, Any] = {k: spec(TOP_PARAM_AXES[k]) for k in params if k != "layers"}
    layers = params["layers"]
    if isinstance(layers, list | tuple):
        out["layers"] = [layer_specs(lp, False) for lp in layers]
    else:
        out["layers"] = layer_specs(layers, True)
    return out


def param_shardings(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p), param_specs(params), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def shard_params(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Place every parameter with its sharding (host arrays go straight to their shards)."""
    return jax.device_put(params, param_shardings(params, mesh))


def pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(POOL_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def count_collectives(hlo_text: str) -> dict[str, int]:
    """All-reduce / all-gather / reduce-scatter / all-to-all / collective-permute ops in compiled HLO."""
    out = {}
    for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        out[op] = hlo_text.count(f" {op}(") + hlo_text.count(f" {op}-start(")
    return out
