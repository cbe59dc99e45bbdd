"""An adapter's device pages built in the pool's dtype hold the same values as the float32 pages cast
to it: B is scaled in float32 and rounded once either way, and every row lands in the same place."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.peft import load_peft_adapter, write_random_peft_adapter
from jlora.config import PRESETS
from jlora.engine import pool_layout
from jlora.pool.device import (
    adapter_page_data,
    largest_write,
    write_block_sizes,
    write_blocks,
    write_pages,
    write_sizes,
)
from jlora.pool.layout import AdapterPlacement

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_pages_in_the_pool_dtype_equal_float32_pages_cast(tmp_path, shards, dtype):
    config = dataclasses.replace(PRESETS["llama2-7b"], num_hidden_layers=2)
    write_random_peft_adapter(
        str(tmp_path / "a"),
        num_layers=2,
        module_shapes=config.module_shapes(),
        rank=8,
        alpha=24,  # scaling 3: B's scale must be applied before rounding
        target_modules=list(MODULES),
        seed=1,
        std=0.01,
    )
    adapter = load_peft_adapter(str(tmp_path / "a"), num_layers=2, module_shapes=config.module_shapes())
    ranks = {m: adapter.module_rank(m) for m in MODULES}
    layout = pool_layout(config, num_pages=64, page_size=16, lora_modules=MODULES, shards=shards)
    wide = adapter_page_data(layout, adapter, ranks, config.module_shapes(), shards, np.float32)
    narrow = adapter_page_data(layout, adapter, ranks, config.module_shapes(), shards, dtype)
    assert narrow.dtype == np.dtype(dtype) and narrow.shape == wide.shape
    np.testing.assert_array_equal(narrow.view(np.uint16), wide.astype(dtype).view(np.uint16))
    assert np.count_nonzero(wide) > 0.5 * 8 * 4 * 2 * 2 * 4096  # the rows are there, not zero pages


@pytest.mark.parametrize(
    "n_pages, largest, sizes",
    [
        (1, 16, [2]),
        (2, 16, [2]),
        (3, 16, [2, 2]),
        (5, 16, [4, 2]),
        (16, 16, [16]),
        (24, 16, [16, 8]),
        (16, 2, [2] * 8),
        (7, 4, [4, 2, 2]),
    ],
)
def test_write_sizes_cover_the_pages_in_powers_of_two(n_pages, largest, sizes):
    assert write_sizes(n_pages, largest) == sizes
    assert set(sizes) <= set(write_block_sizes(largest))


def test_largest_write_fits_the_largest_adapter():
    config = dataclasses.replace(PRESETS["llama2-7b"], num_hidden_layers=2)
    layout = pool_layout(config, num_pages=64, page_size=16, lora_modules=MODULES)
    assert [largest_write(layout, {m: r for m in MODULES}) for r in (8, 16, 32, 64, 128)] == [2, 4, 8, 16, 16]
    assert write_block_sizes(16) == [2, 4, 8, 16]


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("largest", [2, 4])
def test_write_pages_puts_every_page_in_place(shards, unroll, largest):
    """An adapter of 5 pages, written in blocks of up to `largest` pages (the last padded with zero pages
    into the zero page), lands on its scattered pages in every shard; no other unit changes."""
    config = dataclasses.replace(PRESETS["llama2-7b"], num_hidden_layers=2)
    layout = pool_layout(config, num_pages=12, page_size=16, lora_modules=MODULES, shards=shards)
    pages = [9, 2, 11, 5, 7]
    placement = AdapterPlacement(pages=pages, a_start={}, b_start={}, ranks={})
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 2, shards, layout.page_units, layout.head_dim)).astype(np.float32)
    start = rng.standard_normal((2, shards * layout.total_units, layout.head_dim)).astype(np.float32)
    start[:, [s * layout.total_units + u for s in range(shards) for u in range(layout.page_units)]] = 0
    pool = jnp.asarray(start)
    for ids, block in write_blocks(layout, placement, data, largest):
        pool = write_pages(pool, layout, ids, block, unroll)
    expected = start.reshape(2, shards, layout.num_pages, layout.page_units, layout.head_dim).copy()
    for i, p in enumerate(pages):
        expected[:, :, p] = data[i]  # [L, shards, PU, Dh]
    np.testing.assert_array_equal(np.asarray(pool), expected.reshape(start.shape))


def test_adapter_copy_bench_writes_every_adapter_whole(tmp_path, monkeypatch):
    """bench.adapter_copy on a 2-layer pool: each rank, block size and form of the write leaves the
    adapter's pages in the pool as the host had them (its own check, which the GPU run reports)."""
    import bench.common
    from bench import adapter_copy

    monkeypatch.setattr(bench.common, "RESULTS", str(tmp_path))
    out = adapter_copy.main(
        ["--layers", "2", "--pages", "24", "--ranks", "8,32", "--largest", "2,8", "--repeats", "1"]
    )
    assert len(out["rows"]) == 2 * 2 * 3
    assert all(row["written_ok"] for row in out["rows"])
    assert {tuple(r["blocks"]) for r in out["rows"] if r["rank"] == 32} == {(2, 2, 2, 2), (8,)}
