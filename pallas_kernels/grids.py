"""One 1-D launch over several kernels' grids (a mixed step's two batches in one launch): how many
programs a grid holds, and a program's index into its grid."""

from __future__ import annotations


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
