"""Which path an op takes: "reference" (pure jnp, every backend), "pallas" (the kernel, GPU),
"interpret" (the kernel run by the Pallas interpreter: how CPU tests check it), "auto" (the kernel
on GPU, the reference elsewhere)."""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("reference", "pallas", "interpret", "auto")


def resolve(implementation: str) -> str:
    """The concrete path for this process: "reference", "pallas" or "interpret"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if implementation == "pallas" and jax.default_backend() != "gpu":
        raise ValueError("implementation='pallas' needs a GPU backend; use 'interpret' or 'reference' here")
    return implementation
