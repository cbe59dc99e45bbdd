"""Pallas kernels, each beside its pure-jnp reference. Imports jax only, never jlora."""
