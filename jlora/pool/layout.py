"""Geometry of the unified device pool: pages of head_dim-wide units shared by KV cache and adapters.

The device pool is one array [L, num_pages * page_units, Dh]. A page holds `page_units` units of Dh
elements per layer: exactly one KV page (page_size tokens x {K, V} x Hkv heads). Adapter rows are
packed into pages at unit granularity: a row of width w takes ceil(w / Dh) units and never crosses a
page boundary, so an adapter of rank r takes its own r rows, and a page freed by either kind can be
used by the other (S-LoRA's Unified Paging). Page 0 is never handed out and stays zero: padding pairs
and padding tokens read it. Host-only (numpy, no jax): the scheduler uses this.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    num_layers: int
    num_pages: int
    page_size: int  # tokens per KV page
    num_kv_heads: int
    head_dim: int  # the unit width
    module_shapes: tuple[tuple[str, int, int], ...]  # (module, H_in, H_out)

    @property
    def page_units(self) -> int:
        return self.page_size * 2 * self.num_kv_heads

    @property
    def total_units(self) -> int:
        return self.num_pages * self.page_units

    def units(self, width: int) -> int:
        return math.ceil(width / self.head_dim)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (i, o) for m, i, o in self.module_shapes}

    def page_bytes(self, itemsize: int) -> int:
        return self.num_layers * self.page_units * self.head_dim * itemsize

    def kv_unit(self, page: int, slot: int) -> int:
        """First unit of the K heads of token `slot` in `page` (the V heads follow)."""
        return page * self.page_units + slot * 2 * self.num_kv_heads

    def check(self) -> None:
        for m, h_in, h_out in self.module_shapes:
            if max(self.units(h_in), self.units(h_out)) > self.page_units:
                raise ValueError(f"{m}: a row of {max(h_in, h_out)} does not fit a page; raise page_size")


@dataclasses.dataclass
class AdapterPlacement:
    """Where one adapter's rows live: for each module, the first unit of every A row and B row."""

    pages: list[int]
    a_start: dict[str, np.ndarray]  # module -> [r] int32 global unit index
    b_start: dict[str, np.ndarray]
    ranks: dict[str, int]


def pack_rows(layout: PoolLayout, ranks: dict[str, int]) -> tuple[int, list[tuple[str, str, int, int, int]]]:
    """Pack an adapter's rows into pages: (pages needed, [(module, 'a'|'b', row, page_index, unit_offset)])."""
    shapes = layout.shapes()
    placed = []
    page, used = 0, 0
    for m in MODULES:
        r = ranks.get(m, 0)
        if not r:
            continue
        for side, width in (("a", shapes[m][0]), ("b", shapes[m][1])):
            w = layout.units(width)
            for j in range(r):
                if used + w > layout.page_units:
                    page, used = page + 1, 0
                placed.append((m, side, j, page, used))
                used += w
    pages = page + 1 if placed else 0
    return pages, placed


def place_adapter(layout: PoolLayout, ranks: dict[str, int], pages: list[int]) -> AdapterPlacement:
    _, placed = pack_rows(layout, ranks)
    a_start = {m: np.zeros(r, np.int32) for m, r in ranks.items() if r}
    b_start = {m: np.zeros(r, np.int32) for m, r in ranks.items() if r}
    for m, side, j, page_index, offset in placed:
        unit = pages[page_index] * layout.page_units + offset
        (a_start if side == "a" else b_start)[m][j] = unit
    return AdapterPlacement(pages=list(pages), a_start=a_start, b_start=b_start, ranks=dict(ranks))
