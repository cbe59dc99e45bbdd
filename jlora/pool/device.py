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

WRITE_CHUNK = 2  # pages of the smallest compiled write (a rank-8 q/k/v/o adapter of a 7B model is 2 pages)
# pages of the largest: writes come in powers of two from WRITE_CHUNK up to the engine's largest adapter
# (capped here), so that an adapter is one copy and one write, not one per 2 pages (a rank-64 q/k/v/o
# adapter of a 7B model is 16 pages, 134 MB)
MAX_WRITE_PAGES = 16


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


@functools.partial(jax.jit, static_argnames=("page_units", "unroll"), donate_argnums=(0,))
def _write_pages(
    pool: jax.Array, page_ids: jax.Array, data: jax.Array, page_units: int, unroll: bool
) -> jax.Array:
    """Each page of the block (page-major [size, L, shards, PU, Dh]) into its place in every shard's
    units, one dynamic_update_slice a page and shard, in place on the donated pool. Padding pages have
    id 0, the zero page, and are zeros. H200, a rank-64 q/k/v/o 7B adapter (16 pages, 134 MB) already on
    the device: 0.27 ms as one chained block, 0.74 ms as the scatters of the transposed 2-page blocks
    they replaced; copy and write from pinned memory 2.99 against 3.72 ms (bench/adapter_copy.py)."""
    units = pool.shape[1]
    size, _, shards = data.shape[:3]
    data = data.astype(pool.dtype)

    def page(i, pool):
        for shard in range(shards):
            start = shard * (units // shards) + page_ids[i] * page_units
            pool = jax.lax.dynamic_update_slice(pool, data[i, :, shard], (0, start, 0))
        return pool

    if unroll:
        for i in range(size):
            pool = page(i, pool)
        return pool
    return jax.lax.fori_loop(0, size, page, pool)


def write_block_sizes(largest: int = WRITE_CHUNK) -> list[int]:
    """The write block sizes under `largest`: powers of two from WRITE_CHUNK, the shapes the writer
    compiles for."""
    sizes = [WRITE_CHUNK]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes


def write_sizes(n_pages: int, largest: int = WRITE_CHUNK) -> list[int]:
    """Write block sizes covering n_pages: each the largest of write_block_sizes(largest) that the pages
    left fill, the last WRITE_CHUNK at least (its padding pages, zeros, are written into the zero page)."""
    ladder, sizes, left = write_block_sizes(largest), [], n_pages
    while left > 0:
        sizes.append(max((size for size in ladder if size <= left), default=WRITE_CHUNK))
        left -= sizes[-1]
    return sizes


def largest_write(layout: PoolLayout, max_ranks: dict[str, int]) -> int:
    """The largest write block an engine needs: the smallest block size that holds its largest adapter's
    pages, MAX_WRITE_PAGES at most."""
    pages, ladder = pack_rows(layout, max_ranks)[0], write_block_sizes(MAX_WRITE_PAGES)
    return next((size for size in ladder if size >= pages), ladder[-1])


def host_blocks(data: np.ndarray, largest: int = WRITE_CHUNK) -> list[np.ndarray]:
    """Page-major host data [n_pages, L, shards, PU, Dh] as write blocks [size, ...] of write_sizes (the
    last one padded with zero pages): a few compiled write shapes; full blocks are views, not copies."""
    blocks, i = [], 0
    for size in write_sizes(data.shape[0], largest):
        block = data[i : i + size]
        if block.shape[0] < size:
            pad = np.zeros((size - block.shape[0], *data.shape[1:]), data.dtype)
            block = np.concatenate([block, pad])
        blocks.append(block)
        i += size
    return blocks


def block_page_ids(
    layout: PoolLayout, placement: AdapterPlacement, largest: int = WRITE_CHUNK
) -> list[np.ndarray]:
    """The pool page ids [size] of each write block (padding pages: 0, the zero page, which their
    zeros leave as it is)."""
    pages = placement.pages
    out, i = [], 0
    for size in write_sizes(len(pages), largest):
        ids = np.zeros(size, np.int32)
        chunk = pages[i : i + size]
        ids[: len(chunk)] = chunk
        out.append(ids)
        i += size
    return out


def write_blocks(
    layout: PoolLayout, placement: AdapterPlacement, data: np.ndarray, largest: int = WRITE_CHUNK
):
    """(page ids [size], data [size, L, shards, PU, Dh]) blocks of page-major host data."""
    yield from zip(block_page_ids(layout, placement, largest), host_blocks(data, largest))


@dataclasses.dataclass
class PinnedPages:
    """An adapter's write blocks in pinned (page-locked) host memory: the device copies them by DMA,
    several times faster than from pageable numpy memory (bench/host_copy.py: 47.8 vs 7.1 GB/s on the
    H100's host), which is what a cold adapter's first token waits for (T7)."""

    blocks: list[jax.Array]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


def pin_pages(data: np.ndarray, device: Any, largest: int = WRITE_CHUNK) -> PinnedPages:
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    return PinnedPages([jax.device_put(b, pinned) for b in host_blocks(data, largest)])


def to_device(block: jax.Array, device: Any) -> jax.Array:
    """A pinned block copied to the device's own memory (asynchronously)."""
    return jax.device_put(block, jax.sharding.SingleDeviceSharding(device, memory_kind="device"))


def can_pin(device: Any) -> bool:
    return "pinned_host" in {m.kind for m in device.addressable_memories()}


def write_pages(
    pool: jax.Array, layout: PoolLayout, ids: Any, block: Any, unroll: bool | None = None
) -> jax.Array:
    """Write one block (page ids [size], data [size, L, shards, PU, Dh]) into the pool. unroll: the
    pages as a chain of updates (None: except on the CPU, where XLA copied the pool for a chain of 16
    - 200 ms against 5 in a loop, 2 layers of a 7B pool)."""
    if unroll is None:
        unroll = {d.platform for d in pool.devices()} != {"cpu"}
    return _write_pages(pool, ids, block, layout.page_units, unroll)


def empty_block(layout: PoolLayout, shards: int, size: int = WRITE_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """A write of `size` zero pages into the zero page: compiles the writer at start-up."""
    ids = np.zeros(size, np.int32)
    return ids, np.zeros((size, layout.num_layers, shards, layout.page_units, layout.head_dim), np.float32)
