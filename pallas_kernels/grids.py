"""One 1-D launch over two kernels' grids (a mixed step's two batches in one launch): how many programs a
grid holds, a program's index into its grid, and the split of a launch's programs between the two."""

from __future__ import annotations

from collections.abc import Callable

from jax.experimental import pallas as pl


def grid_programs(grid: tuple[int, ...]) -> int:
    """Programs in a grid."""
    out = 1
    for size in grid:
        out *= size
    return out


def grid_index(q, grid: tuple[int, ...]) -> tuple:
    """Program q of a 1-D run over `grid` as its row-major index into grid (the last axis fastest)."""
    ids = []
    for size in reversed(grid[1:]):
        ids.append(q % size)
        q = q // size
    ids.append(q)
    return tuple(reversed(ids))


def either_program(first_grid: tuple[int, ...], first: Callable, second: Callable) -> None:
    """In a launch of grid_programs(first_grid) + M programs: the first ones run first(*their index into
    first_grid), the rest second(q) with q their number from 0 to M - 1."""
    p = pl.program_id(0)
    n = grid_programs(first_grid)

    @pl.when(p < n)
    def _():
        first(*grid_index(p, first_grid))

    @pl.when(p >= n)
    def _():
        second(p - n)
