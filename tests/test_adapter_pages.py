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
from jlora.pool.device import adapter_page_data

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
