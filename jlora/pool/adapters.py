"""Adapter rows on the device: each projection kind has a pool of rank rows; an adapter of rank r
takes r rows of it (its own rank, never the pool's largest). Row 0 stays zero for padding pairs.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints.peft import PeftAdapter
from jlora.config import ModelConfig
from jlora.model.lora import MODULES, LoraWeights


class RowAllocator:
    """Free list of rows 1..capacity-1 (row 0 is the zero row)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free: list[int] = list(range(1, capacity))

    def grow(self, capacity: int) -> None:
        self.free.extend(range(self.capacity, capacity))
        self.capacity = capacity

    def take(self, n: int) -> np.ndarray | None:
        if n > len(self.free):
            return None
        self.free.sort()
        rows, self.free = self.free[:n], self.free[n:]
        return np.asarray(rows, np.int32)

    def give(self, rows: np.ndarray) -> None:
        self.free.extend(int(r) for r in rows)


def adapter_rows(
    adapter: PeftAdapter, module: str, num_layers: int, h_in: int, h_out: int, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """The adapter's rows for one module: A^T rows [L, r, H_in] and scaled B rows [L, r, H_out], in
    `dtype` (B scaled in float32, then rounded once: the same values as float32 rows cast after)."""
    r = adapter.module_rank(module)
    a = np.zeros((num_layers, r, h_in), dtype)
    b = np.zeros((num_layers, r, h_out), dtype)
    for (layer, m), w in adapter.layers.items():
        if m == module:
            a[layer, : w.rank] = w.a
            b[layer, : w.rank] = np.multiply(w.b.T, w.scaling, dtype=np.float32)
    return a, b


class AdapterPool:
    """Device-resident adapters for the reference path: grows by doubling when rows run out."""

    def __init__(self, config: ModelConfig, dtype: Any, initial_rows: int = 64):
        self.config = config
        self.dtype = dtype
        self.shapes = config.module_shapes()
        self.allocators = {m: RowAllocator(initial_rows) for m in MODULES}
        self.weights: dict[str, LoraWeights] = {m: self._zeros(m, initial_rows) for m in MODULES}
        self.rows: dict[str, dict[str, np.ndarray]] = {}  # adapter name -> module -> rows

    def _zeros(self, module: str, rows: int) -> LoraWeights:
        h_in, h_out = self.shapes[module]
        n = self.config.num_hidden_layers
        return LoraWeights(
            a=jnp.zeros((n, rows, h_in), self.dtype), b=jnp.zeros((n, rows, h_out), self.dtype)
        )

    def _grow(self, module: str, needed: int) -> None:
        alloc = self.allocators[module]
        capacity = alloc.capacity
        while len(alloc.free) + (capacity - alloc.capacity) < needed:
            capacity *= 2
        old = self.weights[module]
        new = self._zeros(module, capacity)
        self.weights[module] = LoraWeights(
            a=new.a.at[:, : alloc.capacity].set(old.a), b=new.b.at[:, : alloc.capacity].set(old.b)
        )
        alloc.grow(capacity)

    def add(self, name: str, adapter: PeftAdapter) -> None:
        """Copy an adapter's rows to the device. Nothing changes if it fails."""
        staged = {}
        for m in MODULES:
            if adapter.module_rank(m):
                staged[m] = adapter_rows(adapter, m, self.config.num_hidden_layers, *self.shapes[m])
        rows: dict[str, np.ndarray] = {}
        for m, (a, b) in staged.items():
            if len(self.allocators[m].free) < a.shape[1]:
                self._grow(m, a.shape[1])
            taken = self.allocators[m].take(a.shape[1])
            assert taken is not None
            w = self.weights[m]
            idx = jnp.asarray(taken)
            self.weights[m] = LoraWeights(
                a=w.a.at[:, idx].set(jnp.asarray(a, self.dtype)),
                b=w.b.at[:, idx].set(jnp.asarray(b, self.dtype)),
            )
            rows[m] = taken
        self.rows[name] = rows

    def remove(self, name: str) -> None:
        for m, rows in self.rows.pop(name).items():
            w = self.weights[m]
            idx = jnp.asarray(rows)
            self.weights[m] = LoraWeights(a=w.a.at[:, idx].set(0), b=w.b.at[:, idx].set(0))
            self.allocators[m].give(rows)
