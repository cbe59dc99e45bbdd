"""Rope: rotate-half values, and a form without concatenations (the GPU fuses q's and k's ropes with
v's slice of the fused q/k/v output only when no concatenation heads a fusion of its own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.model.layers import apply_rope


def _rotate_half_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """The Hugging Face Llama formula, in numpy: x * cos + rotate_half(x) * sin."""
    freqs = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)  # float32, as HF
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


@pytest.mark.parametrize("heads,head_dim", [(4, 64), (2, 128)])
def test_rope_matches_rotate_half(heads: int, head_dim: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, heads, head_dim)).astype(np.float32)
    positions = rng.integers(0, 4096, (3, 5)).astype(np.int32)
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))
    np.testing.assert_allclose(got, _rotate_half_rope(x, positions, inv_freq), rtol=1e-4, atol=1e-4)


def test_rope_lowers_without_concatenate() -> None:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 128, 2) / 128))
    x = jax.ShapeDtypeStruct((17, 1, 32, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((17, 1), jnp.int32)
    text = jax.jit(lambda a, p: apply_rope(a, p, inv_freq)).lower(x, pos).as_text()
    assert "concatenate" not in text
