"""bench.kernels.launch_floor: the chain of empty launches passes its value through every launch (so they
run in order), lowers for CUDA as that many Triton calls, and the sweep reports a row per shape."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bench.kernels.launch_floor import empty_launches, launch_floor


def test_chain_runs_every_launch_in_order():
    out = empty_launches(jnp.full((1,), 2.0), launches=5, grid=3, num_warps=1, interpret=True)
    assert float(out[0]) == 7.0  # program 0 of each launch added 1; the others wrote nothing


def test_lowers_for_cuda_as_separate_triton_calls():
    fn = functools.partial(empty_launches, launches=4, grid=132, num_warps=2, interpret=False)
    text = (
        jax.jit(fn)
        .trace(jax.ShapeDtypeStruct((1,), jnp.float32))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert text.count("xla.gpu.triton") == 4


def test_sweep_reports_each_shape():
    rows = launch_floor(2, [1, 4], [1, 2], iters=2)
    assert [(r["grid"], r["num_warps"]) for r in rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert all(r["wall_us_per_launch"] >= 0 and r["launches"] == 2 for r in rows)
