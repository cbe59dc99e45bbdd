"""Which path an op takes: "reference" (pure jnp, every backend), "pallas" (the kernel, GPU),
"interpret" (the kernel run by the Pallas interpreter: how CPU tests check it), "cpu" (the C++ CPU
kernels of pallas_kernels.cpu where an op has one, the reference for the rest), "auto" (the Pallas
kernels on GPU; on the CPU as "cpu"; the reference elsewhere)."""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("reference", "pallas", "interpret", "auto", "cpu")


def resolve(implementation: str) -> str:
    """The concrete path for this process: "reference", "pallas" or "interpret" ("cpu" resolves to
    "reference": an op with a CPU kernel checks cpu_kernels() first)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "cpu":
        if jax.default_backend() != "cpu":
            raise ValueError("implementation='cpu' needs the CPU backend")
        return "reference"
    if implementation == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if implementation == "pallas" and jax.default_backend() != "gpu":
        raise ValueError("implementation='pallas' needs a GPU backend; use 'interpret' or 'reference' here")
    return implementation


def cpu_kernels(implementation: str) -> bool:
    """Whether ops with a C++ CPU kernel (pallas_kernels.cpu) should use it: "cpu", or "auto" on the
    CPU backend. The op still falls back to its reference where the kernel cannot run."""
    return implementation == "cpu" or (implementation == "auto" and jax.default_backend() == "cpu")
