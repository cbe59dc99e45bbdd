"""Gathered LoRA on the CPU, adapter rows read in place from the unified pool: BGMV (bgmv.cc, the
decode LoRA of G projections that read the same x; the contract of pallas_kernels.lora's
lora_decode_group) and SGMV (sgmv.cc, a prefill chunk per sequence; lora_prefill's contract). The
references in pallas_kernels.lora are the oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import kernel_available, require_kernels


def lora_supported(x: jax.Array, pool: jax.Array) -> bool:
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
    require_kernels()
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


def sgmv(
    x: jax.Array,  # [B, T, H_in] float32
    pool: jax.Array,  # [L, U, Dh] float32
    layer: jax.Array,  # [] int32
    a_start: jax.Array,  # [B, R] int32; <= 0 for padding rows
    b_start: jax.Array,  # [B, R] int32
    h_out: int,
) -> jax.Array:  # [B, T, H_out] float32
    """Each sequence's chunk times its adapter's A^T rows, then its B rows."""
    require_kernels()
    out = jax.ShapeDtypeStruct((*x.shape[:2], h_out), jnp.float32)
    return jax.ffi.ffi_call("jlora_sgmv", out)(
        x,
        pool,
        jnp.asarray(layer, jnp.int32).reshape(()),
        a_start.astype(jnp.int32),
        b_start.astype(jnp.int32),
    )
