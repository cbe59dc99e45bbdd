"""Host-side manager of the unified pool: one free list of pages for KV cache and adapters.

Sequences own KV pages through page tables; resident adapters own pages through placements and are
evicted least-recently-used when no running sequence holds them. Pure Python, no jax.
"""

from __future__ import annotations

import collections
import dataclasses

from jlora.pool.layout import AdapterPlacement, PoolLayout, pack_rows, place_adapter


class OutOfPages(Exception):
    pass


@dataclasses.dataclass
class ResidentAdapter:
    placement: AdapterPlacement
    refcount: int = 0  # running sequences that use it


class PoolManager:
    def __init__(self, layout: PoolLayout):
        self.layout = layout
        self.free: list[int] = list(range(layout.num_pages - 1, 0, -1))  # page 0 is the zero page
        self.page_tables: dict[int, list[int]] = {}  # sequence id -> pages
        self.adapters: collections.OrderedDict[str, ResidentAdapter] = collections.OrderedDict()  # LRU order

    # ---- pages ----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfPages(n)
        pages = [self.free.pop() for _ in range(n)]
        return pages

    def _give(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))

    # ---- KV -------------------------------------------------------------------------------------
    def pages_for_tokens(self, n_tokens: int) -> int:
        return -(-n_tokens // self.layout.page_size)

    def kv_pages_needed(self, seq_id: int, n_tokens: int) -> int:
        return max(0, self.pages_for_tokens(n_tokens) - len(self.page_tables.get(seq_id, [])))

    def grow_kv(self, seq_id: int, n_tokens: int) -> None:
        """Make the sequence's page table cover n_tokens tokens (raises OutOfPages, changing nothing)."""
        need = self.kv_pages_needed(seq_id, n_tokens)
        pages = self._take(need)
        self.page_tables.setdefault(seq_id, []).extend(pages)

    def free_kv(self, seq_id: int) -> None:
        self._give(self.page_tables.pop(seq_id, []))

    # ---- adapters -------------------------------------------------------------------------------
    def adapter_pages_needed(self, ranks: dict[str, int]) -> int:
        return pack_rows(self.layout, ranks)[0]

    def is_resident(self, name: str) -> bool:
        return name in self.adapters

    def place(self, name: str, ranks: dict[str, int]) -> AdapterPlacement:
        """Give an adapter pages (raises OutOfPages, changing nothing). The caller copies its weights in."""
        assert name not in self.adapters
        pages = self._take(self.adapter_pages_needed(ranks))
        placement = place_adapter(self.layout, ranks, pages)
        self.adapters[name] = ResidentAdapter(placement)
        return placement

    def touch(self, name: str) -> None:
        self.adapters.move_to_end(name)

    def acquire(self, name: str) -> None:
        self.adapters[name].refcount += 1
        self.touch(name)

    def release(self, name: str) -> None:
        self.adapters[name].refcount -= 1
        assert self.adapters[name].refcount >= 0

    def evictable(self) -> list[str]:
        """Adapters no running sequence holds, least recently used first."""
        return [n for n, a in self.adapters.items() if a.refcount == 0]

    def evict(self, name: str) -> None:
        resident = self.adapters.pop(name)
        assert resident.refcount == 0, f"evicting adapter {name} in use"
        self._give(resident.placement.pages)

    # ---- invariants -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every page 1..N-1 is owned exactly once: free, a sequence's, or an adapter's."""
        owned: list[int] = list(self.free)
        for pages in self.page_tables.values():
            owned.extend(pages)
        for a in self.adapters.values():
            owned.extend(a.placement.pages)
            assert a.refcount >= 0
        assert 0 not in owned, "the zero page was handed out"
        assert sorted(owned) == list(range(1, self.layout.num_pages)), "a page is lost or owned twice"
