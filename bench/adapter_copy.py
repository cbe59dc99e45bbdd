"""What paging one adapter in costs (T7): its host pages copied to the device and written into the pool,
timed to the pool's completion, by rank, by the largest write block (`--largest 2` is one copy and
one write per 2 pages, as before; the engine now takes its largest adapter's pages in one) and by the
write's form (`slices`: jlora's, a dynamic_update_slice a page, chained except on the CPU;
`slices-unrolled` and `slices-loop` force either; `scatter`: the one scatter of the
transposed block it replaced). Also the copy alone and the writes alone (the blocks already on the
device). The pool has the engine's shape
(Llama-2-7B geometry, `--pages` pages of bfloat16, rank-r q/k/v/o adapters). On a GPU the pages sit in
pinned host memory, as the engine keeps them; elsewhere they are numpy.

python -m bench.adapter_copy [--geometry llama2-7b] [--pages 3000] [--ranks 8,16,32,64] [--largest 2,16]
    [--methods slices,scatter]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@functools.cache
def _scatter_writer():
    """The write before (until 2026-12-04): the block transposed to [L, shards, size, PU, Dh] and
    scattered into the pool viewed as pages, out-of-range ids dropped."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("page_units",), donate_argnums=(0,))
    def write(pool, page_ids, data, page_units):
        n_layers, units, dh = pool.shape
        shards = data.shape[2]
        paged = pool.reshape(n_layers, shards, units // (shards * page_units), page_units, dh)
        data = jnp.transpose(data, (1, 2, 0, 3, 4))
        paged = paged.at[:, :, page_ids].set(data.astype(pool.dtype), mode="drop")
        return paged.reshape(n_layers, units, dh)

    return write


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="llama2-7b", help="a preset of jlora.config.PRESETS")
    ap.add_argument("--layers", type=int, default=0, help="layers of the geometry (0: all)")
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--largest", default="2,16", help="largest write blocks to compare, in pages")
    ap.add_argument(
        "--methods", default="slices-unrolled,slices-loop,scatter", help="the write's forms to compare"
    )
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from bench.common import write_result
    from jlora.config import PRESETS
    from jlora.engine import pool_layout
    from jlora.pool.device import (
        block_page_ids,
        can_pin,
        host_blocks,
        new_pool,
        pin_pages,
        to_device,
        write_pages,
        write_sizes,
    )
    from jlora.pool.layout import pack_rows, place_adapter

    config = PRESETS[args.geometry]
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    layout = pool_layout(config, num_pages=args.pages, page_size=16, lora_modules=TARGETS)
    device = jax.devices()[0]
    pinned = device.platform == "gpu" and can_pin(device)
    state = {"pool": new_pool(layout, jnp.bfloat16)}
    dtype = np.dtype(jnp.bfloat16)
    rows = []
    for rank in _ints(args.ranks):
        ranks = {m: rank for m in TARGETS}
        n_pages = pack_rows(layout, ranks)[0]
        placement = place_adapter(layout, ranks, list(range(1, n_pages + 1)))
        shape = (n_pages, layout.num_layers, 1, layout.page_units, layout.head_dim)
        data = np.random.default_rng(rank).standard_normal(shape, np.float32).astype(dtype)
        for largest in _ints(args.largest):
            ids = [jnp.asarray(i) for i in block_page_ids(layout, placement, largest)]
            blocks = pin_pages(data, device, largest).blocks if pinned else host_blocks(data, largest)
            on_device = jax.block_until_ready([to_device(block, device) for block in blocks])
            for method in args.methods.split(","):
                if method.startswith("slices"):
                    unroll = {"slices": None, "slices-unrolled": True, "slices-loop": False}[method]

                    def write(pool, ids, block, unroll=unroll):
                        return write_pages(pool, layout, ids, block, unroll)
                else:

                    def write(pool, ids, block):
                        return _scatter_writer()(pool, ids, block, page_units=layout.page_units)

                rows.append(_time_one(state, write, ids, blocks, on_device, device, args.repeats))
                row = rows[-1]
                row.update(rank=rank, pages=n_pages, largest=largest, method=method, bytes=int(data.nbytes))
                row["blocks"] = write_sizes(n_pages, largest)
                row["GBps"] = row["bytes"] / row["copy_and_write_ms"] / 1e6
                units = slice(
                    placement.pages[0] * layout.page_units, (placement.pages[-1] + 1) * layout.page_units
                )
                written = np.asarray(state["pool"][:, units])  # the adapter's pages (consecutive here)
                expected = np.moveaxis(data[:, :, 0], 0, 1).reshape(written.shape)  # [L, pages * PU, Dh]
                row["written_ok"] = bool(np.array_equal(written, expected))
                print(
                    f"rank {rank:3d} ({n_pages:2d} pages, {data.nbytes / 1e6:6.1f} MB) {method:7s} blocks "
                    f"{row['blocks']}: copy+write {row['copy_and_write_ms']:.3f} ms ({row['GBps']:.1f} GB/s), "
                    f"copy {row['copy_ms']:.3f}, write {row['write_ms']:.3f}, written {row['written_ok']}"
                )
    out = {"geometry": args.geometry, "layers": layout.num_layers, "pool_pages": args.pages, "pinned": pinned}
    out["rows"] = rows
    print("wrote", write_result("adapter-copy", out))
    return out


def _time_one(state: dict, write, ids, blocks, on_device, device, repeats: int) -> dict:
    """Best wall times (ms) of copying the blocks and writing them, of the copy alone, and of the writes
    from blocks already on the device; every write compiled first."""
    import jax

    from bench.kernels.timing import best_wall_seconds
    from jlora.pool.device import to_device

    def copy_and_write():
        for i, block in zip(ids, blocks):
            state["pool"] = write(state["pool"], i, to_device(block, device))
        return state["pool"]

    def copy_only():
        return [to_device(block, device) for block in blocks]

    def write_only():
        for i, block in zip(ids, on_device):
            state["pool"] = write(state["pool"], i, block)
        return state["pool"]

    jax.block_until_ready(write_only())  # compiles each block shape
    return {
        "copy_and_write_ms": best_wall_seconds(copy_and_write, repeats) * 1e3,
        "copy_ms": best_wall_seconds(copy_only, repeats) * 1e3,
        "write_ms": best_wall_seconds(write_only, repeats) * 1e3,
    }


if __name__ == "__main__":
    main()
