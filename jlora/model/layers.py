"""Building blocks: RMSNorm, Linear, rotary embeddings (default, linear, llama3)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from pallas_kernels.cpu import panel_matmul


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Hugging Face's LlamaRMSNorm: normalize in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return rms_norm(x, weight, self.eps)


class Linear(nn.Module):
    """nn.Dense's parameters ("kernel" [in, out], "bias") and math. A kernel stored instead as column
    panels ("panels" [P, in, 48], pallas_kernels.cpu.pack_panels; see pack_linear_weights) is multiplied
    by the CPU panel kernel."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)  # as nn.Dense's promote_dtype
        if self.has_variable("params", "panels"):
            y = panel_matmul(x, self.get_variable("params", "panels"), self.features)
        else:
            init = nn.initializers.lecun_normal()
            kernel = self.param("kernel", init, (x.shape[-1], self.features), self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, with the config's scaling applied (as transformers does)."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = config.rope_scaling
    if s.kind == "linear":
        inv = inv / s.factor
    elif s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        mid = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_mid, mid, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half rope. x: [B, T, N, H]; positions: [B, T].

    The halves as a size-2 axis (reversed and signed for the rotation, cos/sin broadcast over it), not
    concatenations: on the GPU a concatenation heads its own fusion, so q's and k's ropes and v's slice
    of the fused q/k/v output would each be a launch of their own; elementwise they can share one.
    """
    half = x.shape[-1] // 2
    freqs = positions.astype(jnp.float32)[..., None, None, None] * jnp.asarray(inv_freq)  # [B, T, 1, 1, H/2]
    cos, sin = jnp.cos(freqs).astype(x.dtype), jnp.sin(freqs).astype(x.dtype)
    halves = x.reshape(*x.shape[:-1], 2, half)  # [B, T, N, 2, H/2]
    sign = jnp.asarray([[-1.0], [1.0]], x.dtype)  # rotate-half: (-x2, x1)
    rotated = halves[..., ::-1, :] * sign
    return (halves * cos + rotated * sin).reshape(x.shape)
