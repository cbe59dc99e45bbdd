"""Timing small device ops: many calls chained inside one jit (launch and sync overhead drop out),
inputs rotated so nothing is hoisted or served from L2; bandwidth measured in the same process."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def best_wall_seconds(fn: Callable[[], object], repeats: int = 7) -> float:
    """The best wall time of fn() to its result (blocked on), over `repeats` calls after one warm-up:
    for whole calls that take milliseconds, where launch overhead does not matter."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _chained(op: Callable, rotations: list[tuple], iters: int) -> Callable:
    """jit(fixed, stacked) running op iters times: iteration i uses rotations[i % len], and every
    output feeds a checksum (no dead code)."""
    n_rot = len(rotations)

    @jax.jit
    def run(fixed, stacked):
        def body(i, acc):
            args = jax.tree.map(lambda s: s[i % n_rot], stacked)
            out = op(*fixed, *args)
            return acc + jnp.sum(out.astype(jnp.float32)) * 1e-9

        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    return run


def _stack(rotations: list[tuple]):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rotations)


def chained_seconds(
    op: Callable, fixed: tuple, rotations: list[tuple], iters: int = 100, repeats: int = 5
) -> float:
    """Median seconds of one op(*fixed, *args) call. `fixed` (a pool, weights) is passed once;
    `rotations` is a list of argument tuples of equal shapes. Includes the harness's own slicing and
    checksum kernels and the loop's per-iteration cost (device_kernel_seconds leaves them out)."""
    run, stacked = _chained(op, rotations, iters), _stack(rotations)
    jax.block_until_ready(run(fixed, stacked))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(fixed, stacked))
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] / iters


def device_kernel_seconds(
    op: Callable, fixed: tuple, rotations: list[tuple], iters: int = 50
) -> dict[str, float] | None:
    """Device time per op(*fixed, *args) call from a profiler trace of the chained loop: seconds by
    kernel name (numbered copies folded) and "busy", all kernels together (the harness's slicing and
    checksum kernels included: subtract a trivial op's busy time for the op's own). None without a GPU
    (the trace has no device plane)."""
    import tempfile

    from bench.profile import busiest_stream, gpu_lines

    if jax.default_backend() != "gpu":
        return None
    run, stacked = _chained(op, rotations, iters), _stack(rotations)
    jax.block_until_ready(run(fixed, stacked))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(run(fixed, stacked))
        jax.profiler.stop_trace()
        read = gpu_lines(trace_dir)
    if isinstance(read, str):
        return None
    lines = read[0]
    kernels = {name: ms * 1e-3 / iters for name, (ms, _) in lines[busiest_stream(lines)].items()}
    return {**kernels, "busy": sum(kernels.values())}


def bandwidth() -> dict[str, float]:
    """Copy (bytes read + written) and read-only bandwidth in TB/s, 2 GiB buffers: bfloat16 on
    accelerators, float32 on CPU, where bfloat16 arithmetic is converted element by element and the
    copy would measure that conversion rather than memory (and a roofline built on it would claim
    more than 100%)."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    x = jnp.ones(((2 << 30) // jnp.dtype(dtype).itemsize,), dtype)
    copy = jax.jit(lambda x: x + 1)
    read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    out = {}
    for name, fn, moved in (("copy_TBps", copy, 2 * x.nbytes), ("read_TBps", read, x.nbytes)):
        jax.block_until_ready(fn(x))
        start = time.perf_counter()
        for _ in range(20):
            r = fn(x)
        jax.block_until_ready(r)
        out[name] = moved * 20 / (time.perf_counter() - start) / 1e12
    return out


def roofline_TBps(bw: dict[str, float]) -> float:
    """The bandwidth every roofline here divides bytes by: the copy bandwidth on GPUs (within ~6% of
    read-only there, and every GPU figure so far used it), the read-only bandwidth on CPU, where a copy
    runs at a fifth of the read rate (6.4 vs 28.6 GB/s on the 2-core machine) and read-mostly steps
    beat it."""
    return bw["read_TBps"] if jax.default_backend() == "cpu" else bw["copy_TBps"]
