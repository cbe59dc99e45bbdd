"""How LoRA enters the model: per-layer pool arrays plus per-step (token, row) pairs.

The computation itself lives in pallas_kernels.lora (kernel or pure-jnp reference); this module only
routes a projection's input and output through it. Base weights are never touched.
"""

from __future__ import annotations

import flax.struct
import jax

from pallas_kernels.lora import lora_rows

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@flax.struct.dataclass
class LoraWeights:
    """The device adapter pool of one projection kind, all layers stacked."""

    a: jax.Array  # [L, R, H_in]   A^T rows; row 0 is all zeros
    b: jax.Array  # [L, R, H_out]  B rows with the adapter's scaling folded in; row 0 is all zeros


@flax.struct.dataclass
class LoraPairs:
    """Which pool rows each token uses, for one projection kind, for one step."""

    token_index: jax.Array  # [K] int32, index into the step's flattened tokens (B*T)
    row_index: jax.Array  # [K] int32, pool row; padding pairs use row 0 (zeros)


def lora_delta(
    x: jax.Array,  # [B, T, H_in]
    layer_weights: LoraWeights,  # one layer's slice: a [R, H_in], b [R, H_out]
    pairs: LoraPairs,
    implementation: str = "reference",
) -> jax.Array:  # [B, T, H_out]
    b, t, h = x.shape
    flat = x.reshape(b * t, h)
    delta = lora_rows(
        flat,
        layer_weights.a,
        layer_weights.b,
        pairs.token_index,
        pairs.row_index,
        implementation=implementation,
    )
    return delta.reshape(b, t, -1)
