"""BGMV on the CPU (bgmv.cc): the decode LoRA of G projections that read the same x, rows read in
place from the unified pool. Same contract as pallas_kernels.lora.lora_decode_group, whose reference
is the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import kernel_available


def bgmv_supported(x: jax.Array, pool: jax.Array) -> bool:
    """The kernel runs here: the CPU backend with the library built, float32 activations and pool."""
    return x.dtype == jnp.float32 and pool.dtype == jnp.float32 and kernel_available()


def bgmv_group(
    x: jax.Array,  # [N, H_in] float32
    pool: jax.Array,  # [L, U, Dh] float32
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [G*K] int32
    b_start: jax.Array,  # [G*K] int32
    offsets: jax.Array,  # [G*(N+1)] int32, projection m's into its own K
    h_outs: tuple[int, ...],
) -> jax.Array:  # [N, sum(h_outs)] float32
    """Each token's sum over its pairs of (x . A row) * B row, the G projections side by side."""
    out = jax.ShapeDtypeStruct((x.shape[0], sum(h_outs)), jnp.float32)
    return jax.ffi.ffi_call("jlora_bgmv", out)(
        x,
        pool,
        jnp.asarray(layer, jnp.int32).reshape(()),
        a_start.astype(jnp.int32),
        b_start.astype(jnp.int32),
        offsets.astype(jnp.int32),
        h_outs=np.asarray(h_outs, np.int64),
    )
