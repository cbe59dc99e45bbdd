"""The unified pool on the device, and copying adapter pages into it (host -> device)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.peft import PeftAdapter
from jlora.pool.adapters import adapter_rows
from jlora.pool.layout import MODULES, AdapterPlacement, PoolLayout, pack_rows
from jlora.sharding import shard_lora_rows

WRITE_CHUNK = 2  # pages per compiled write (a rank-8 q/k/v/o adapter of a 7B model is 2 pages)


def new_pool(layout: PoolLayout, dtype: Any, shards: int = 1, sharding: Any = None) -> jax.Array:
    """[L, shards * U, Dh] zeros: each model shard owns one contiguous block of U units. Committed to
    its device(s) from the start, as the steps return it: the page writer compiled at start-up for an
    uncommitted pool compiled again at the first adapter load after a step."""
    shape = (layout.num_layers, shards * layout.total_units, layout.head_dim)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def adapter_page_data(
    layout: PoolLayout,
    adapter: PeftAdapter,
    ranks: dict[str, int],
    full_shapes: dict[str, tuple[int, int]],
    shards: int = 1,
    dtype: Any = np.float32,
) -> np.ndarray:
    """The adapter's pages as page-major host data [n_pages, L, shards, page_units, Dh] in `dtype` (rows
    placed as pack_rows says; each shard gets its slice of every row, as jlora.sharding partitions the
    layer it adapts). Built in place: each module's rows are converted to `dtype` once and copied to
    their spans, with no float32 copy of the pages nor a transpose after (a 7B rank-8 q/k/v/o adapter,
    16.8 MB of bfloat16, read and laid out in 67 ms on this 2-core CPU, 74 ms before)."""
    n_pages, placed = pack_rows(layout, ranks)
    dh = layout.head_dim
    data = np.zeros((n_pages, layout.num_layers, shards, layout.page_units, dh), dtype)
    flat = data.reshape(n_pages, layout.num_layers, shards, -1)  # a view: a row's units are one span
    full = {
        m: adapter_rows(adapter, m, layout.num_layers, *full_shapes[m], dtype=dtype)
        for m in MODULES
        if ranks.get(m)
    }  # in the pool's dtype from the start: no float32 copy to cast (it was most of a load's layout time)
    for shard in range(shards):
        rows = {m: shard_lora_rows(m, a, b, shard, shards) for m, (a, b) in full.items()}
        for m, side, j, page_index, offset in placed:
            a, b = rows[m]
            row = (a if side == "a" else b)[:, j]  # [L, width]; the rest of its last unit stays zero
            flat[page_index, :, shard, offset * dh : offset * dh + row.shape[1]] = row
    return data


@functools.partial(jax.jit, static_argnames=("page_units",), donate_argnums=(0,))
def _write_pages(pool: jax.Array, page_ids: jax.Array, data: jax.Array, page_units: int) -> jax.Array:
    n_layers, units, dh = pool.shape
    shards = data.shape[2]
    paged = pool.reshape(n_layers, shards, units // (shards * page_units), page_units, dh)
    data = jnp.transpose(data, (1, 2, 0, 3, 4))  # page-major host layout -> [L, shards, pages, PU, Dh]
    paged = paged.at[:, :, page_ids].set(data.astype(pool.dtype), mode="drop")
    return paged.reshape(n_layers, units, dh)


def host_blocks(data: np.ndarray) -> list[np.ndarray]:
    """Page-major host data [n_pages, L, shards, PU, Dh] as write blocks [WRITE_CHUNK, ...] (the last
    one padded with zero pages): one compiled write shape; full blocks are views, not copies."""
    blocks = []
    for i in range(0, data.shape[0], WRITE_CHUNK):
        block = data[i : i + WRITE_CHUNK]
        if block.shape[0] < WRITE_CHUNK:
            pad = np.zeros((WRITE_CHUNK - block.shape[0], *data.shape[1:]), data.dtype)
            block = np.concatenate([block, pad])
        blocks.append(block)
    return blocks


def block_page_ids(layout: PoolLayout, placement: AdapterPlacement) -> list[np.ndarray]:
    """The pool page ids [WRITE_CHUNK] of each write block (padding pages out of range: dropped)."""
    pages = placement.pages
    out = []
    for i in range(0, len(pages), WRITE_CHUNK):
        ids = np.full(WRITE_CHUNK, layout.num_pages, np.int32)
        chunk = pages[i : i + WRITE_CHUNK]
        ids[: len(chunk)] = chunk
        out.append(ids)
    return out


def write_blocks(layout: PoolLayout, placement: AdapterPlacement, data: np.ndarray):
    """(page ids [WRITE_CHUNK], data [WRITE_CHUNK, L, shards, PU, Dh]) blocks of page-major host data."""
    yield from zip(block_page_ids(layout, placement), host_blocks(data))


@dataclasses.dataclass
class PinnedPages:
    """An adapter's write blocks in pinned (page-locked) host memory: the device copies them by DMA,
    several times faster than from pageable numpy memory (bench/host_copy.py: 47.8 vs 7.1 GB/s on the
    H100's host), which is what a cold adapter's first token waits for (T7)."""

    blocks: list[jax.Array]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


def pin_pages(data: np.ndarray, device: Any) -> PinnedPages:
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    return PinnedPages([jax.device_put(b, pinned) for b in host_blocks(data)])


def to_device(block: jax.Array, device: Any) -> jax.Array:
    """A pinned block copied to the device's own memory (asynchronously)."""
    return jax.device_put(block, jax.sharding.SingleDeviceSharding(device, memory_kind="device"))


def can_pin(device: Any) -> bool:
    return "pinned_host" in {m.kind for m in device.addressable_memories()}


def write_pages(pool: jax.Array, layout: PoolLayout, ids: Any, block: Any) -> jax.Array:
    """Write one block (page ids [WRITE_CHUNK], data [WRITE_CHUNK, L, shards, PU, Dh]) into the pool."""
    return _write_pages(pool, ids, block, layout.page_units)


def empty_block(layout: PoolLayout, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """A write whose page ids are all out of range (dropped): compiles the writer at start-up."""
    ids = np.full(WRITE_CHUNK, layout.num_pages, np.int32)
    return ids, np.zeros(
        (WRITE_CHUNK, layout.num_layers, shards, layout.page_units, layout.head_dim), np.float32
    )
