"""What a Pallas launch costs with no work in it: K back-to-back launches of a kernel whose programs
do nothing but the first one's store, timed in a chained loop against the same loop without them, for
grids as large as the decode LoRA launches' and for each num_warps.

At slora-trace's n = 5 a decode step runs 4 BGMV launches a layer (128 a step) at ~4.3 us each on the
H200, and one layer's four take 14.5-16.1 us in bench.kernels.lora_trace_sweep. This floor says how much
of that any restructuring of the LoRA work could save while it keeps the launch count (bench/RESULTS.md,
twentieth session).

python -m bench.kernels.launch_floor [--launches 64] [--grids 1,132,1632,2048] [--warps 1,2,4]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bench.common import write_result
from bench.kernels.timing import chained_seconds, device_kernel_seconds


def _empty_kernel(x_ref, o_ref):
    """Program 0 passes the chain's value on (x + 1); every other program does nothing."""

    @pl.when(pl.program_id(0) == 0)
    def _():
        o_ref[0] = x_ref[0] + 1.0


def empty_launches(x: jax.Array, *, launches: int, grid: int, num_warps: int, interpret: bool) -> jax.Array:
    """x [1] float32 through `launches` empty launches of `grid` programs, each depending on the last
    (so they run one after another, as a step's kernels do)."""
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    call = pl.pallas_call(
        _empty_kernel,
        out_shape=jax.ShapeDtypeStruct((1,), jnp.float32),
        grid=(grid,),
        compiler_params=compiler_params,
        interpret=interpret,
        name="empty_launch",
    )
    for _ in range(launches):
        x = call(x)
    return x


def launch_floor(launches: int, grids: list[int], warps: list[int], iters: int = 20) -> list[dict]:
    """Per (grid, num_warps): seconds a launch adds to a chain of launches (wall, from the chained loop
    against the loop without them) and the kernels' own device time a launch (GPU only)."""
    interpret = jax.default_backend() != "gpu"
    rotations = [(jnp.zeros((1,), jnp.float32) + i,) for i in range(2)]
    base = chained_seconds(lambda x: x + 1.0, (), rotations, iters=iters)
    rows = []
    for grid in grids:
        for num_warps in warps:
            op = functools.partial(
                empty_launches, launches=launches, grid=grid, num_warps=num_warps, interpret=interpret
            )
            wall = chained_seconds(op, (), rotations, iters=iters)
            kernels = device_kernel_seconds(op, (), rotations, iters=iters)
            row = {
                "grid": grid,
                "num_warps": num_warps,
                "launches": launches,
                "wall_us_per_launch": max(wall - base, 0.0) / launches * 1e6,
            }
            if kernels is not None:
                ours = [v for k, v in kernels.items() if "empty_launch" in k]
                row["kernel_us_per_launch"] = sum(ours) / launches * 1e6 if ours else float("nan")
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=64)
    ap.add_argument(
        "--grids", default="1,132,1632,2048", help="programs a launch (1,632: n = 5's q/k/v expand)"
    )
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    rows = launch_floor(
        args.launches,
        [int(v) for v in args.grids.split(",")],
        [int(v) for v in args.warps.split(",")],
        args.iters,
    )
    path = write_result("kernels-launch-floor", {"launches": args.launches, "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
