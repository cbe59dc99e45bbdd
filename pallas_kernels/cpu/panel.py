"""x @ W with W stored as column panels: packing, and the kernel or the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import kernel_available, require_kernels
from pallas_kernels.cpu.reference import panel_matmul_reference

PANEL = 48  # columns per panel (the kernel's register tile: 3 vectors of 16 floats)
IMPLEMENTATIONS = ("auto", "kernel", "reference")


def pack_panels(w: jax.Array | np.ndarray) -> jax.Array:
    """[..., K, N] -> [..., P, K, 48], P = ceil(N / 48); columns past N are zeros."""
    *lead, k, n = w.shape
    p = -(-n // PANEL)
    w = jnp.asarray(w)
    if p * PANEL != n:
        w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, 0), (0, p * PANEL - n)])
    w = w.reshape(*lead, k, p, PANEL)
    return jnp.moveaxis(w, -2, -3)


def panel_matmul(x: jax.Array, panels: jax.Array, n: int, *, implementation: str = "auto") -> jax.Array:
    """x [..., K] @ W [K, n] for W = unpack(panels), panels [P, K, 48]. "auto": the C++ kernel on the
    CPU backend for float32 (where it builds), the reference otherwise."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, not {implementation!r}")
    if panels.ndim != 3 or panels.shape[2] != PANEL:
        raise ValueError(f"panels must be [P, K, {PANEL}]; got {panels.shape}")
    if x.shape[-1] != panels.shape[1]:
        raise ValueError(f"x width {x.shape[-1]} != panels' K {panels.shape[1]}")
    if not 0 < n <= panels.shape[0] * PANEL:
        raise ValueError(f"n={n} outside the panels' {panels.shape[0] * PANEL} columns")
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    f32 = x.dtype == jnp.float32 and panels.dtype == jnp.float32
    use_kernel = implementation == "kernel" or (implementation == "auto" and f32 and kernel_available())
    if use_kernel:
        if not f32:
            raise ValueError(f"the CPU panel kernel takes float32; got {x.dtype} x {panels.dtype}")
        require_kernels()
        if flat.shape[0] == 0:
            return jnp.zeros((*lead, n), x.dtype)
        out = jax.ShapeDtypeStruct((flat.shape[0], panels.shape[0] * PANEL), jnp.float32)
        y = jax.ffi.ffi_call("jlora_panel_gemm", out)(flat, panels)
        y = y[:, :n] if y.shape[1] != n else y
    else:
        y = panel_matmul_reference(flat, panels, n)
    return y.reshape(*lead, n)
