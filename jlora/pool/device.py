"""The unified pool on the device, and copying adapter pages into it (host -> device)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.peft import PeftAdapter
from jlora.pool.adapters import adapter_rows
from jlora.pool.layout import MODULES, AdapterPlacement, PoolLayout, pack_rows

WRITE_CHUNK = 8  # pages per compiled write


def new_pool(layout: PoolLayout, dtype: Any) -> jax.Array:
    return jnp.zeros((layout.num_layers, layout.total_units, layout.head_dim), dtype)


def adapter_page_data(layout: PoolLayout, adapter: PeftAdapter, ranks: dict[str, int]) -> np.ndarray:
    """The adapter's pages as host data [L, n_pages, page_units, Dh] (rows placed as pack_rows says)."""
    n_pages, placed = pack_rows(layout, ranks)
    dh = layout.head_dim
    data = np.zeros((layout.num_layers, n_pages, layout.page_units, dh), np.float32)
    shapes = layout.shapes()
    rows = {m: adapter_rows(adapter, m, layout.num_layers, *shapes[m]) for m in MODULES if ranks.get(m)}
    for m, side, j, page_index, offset in placed:
        a, b = rows[m]
        row = (a if side == "a" else b)[:, j]  # [L, width]
        units = layout.units(row.shape[1])
        padded = np.zeros((layout.num_layers, units * dh), np.float32)
        padded[:, : row.shape[1]] = row
        data[:, page_index, offset : offset + units] = padded.reshape(layout.num_layers, units, dh)
    return data


@functools.partial(jax.jit, static_argnames=("page_units",), donate_argnums=(0,))
def _write_pages(pool: jax.Array, page_ids: jax.Array, data: jax.Array, page_units: int) -> jax.Array:
    n_layers, units, dh = pool.shape
    paged = pool.reshape(n_layers, units // page_units, page_units, dh)
    paged = paged.at[:, page_ids].set(data.astype(pool.dtype), mode="drop")
    return paged.reshape(n_layers, units, dh)


def write_adapter(pool: jax.Array, layout: PoolLayout, placement: AdapterPlacement, data: np.ndarray) -> jax.Array:
    """Copy an adapter's page data into its pages, WRITE_CHUNK pages per call (one compiled shape)."""
    pages = placement.pages
    for i in range(0, len(pages), WRITE_CHUNK):
        ids = np.full(WRITE_CHUNK, layout.num_pages, np.int32)  # out of range: dropped
        chunk = pages[i : i + WRITE_CHUNK]
        ids[: len(chunk)] = chunk
        block = np.zeros((layout.num_layers, WRITE_CHUNK, layout.page_units, layout.head_dim), np.float32)
        block[:, : len(chunk)] = data[:, i : i + len(chunk)]
        pool = _write_pages(pool, jnp.asarray(ids), jnp.asarray(np.asarray(block, dtype=pool.dtype)), layout.page_units)
    return pool


def warm_up_writer(pool: jax.Array, layout: PoolLayout) -> jax.Array:
    """Compile the page writer at start-up (the write is dropped: every page id is out of range)."""
    ids = np.full(WRITE_CHUNK, layout.num_pages, np.int32)
    block = np.zeros((layout.num_layers, WRITE_CHUNK, layout.page_units, layout.head_dim), dtype=pool.dtype)
    return _write_pages(pool, jnp.asarray(ids), jnp.asarray(block), layout.page_units)
