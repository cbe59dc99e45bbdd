"""The benchmark drivers' own arithmetic, collected by `make test` (pyproject testpaths; tests/ never
imports bench): the S-LoRA trace's distributions, and decode_7b's pool holding a full batch (32
requests' whole KV and 32 distinct adapters at once) for every geometry and model-parallel degree it
is run at. An under-sized pool once ran the Llama-2-70B geometry at 12/7/4 requests per step while
reporting batch 32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.common import batch_filled
from bench.decode_7b import NEW, PROMPT, RANK, TARGETS, pool_pages
from bench.trace import adapter_ranks, slora_trace
from jlora.config import PRESETS
from jlora.engine import pool_layout
from jlora.pool.memory import PoolManager


@pytest.mark.parametrize("geometry", ["llama2-7b", "llama2-70b", "llama3-8b"])
@pytest.mark.parametrize("mp", [1, 2, 4])
def test_decode_7b_pool_holds_the_whole_batch(geometry, mp):
    config = dataclasses.replace(PRESETS[geometry], num_hidden_layers=32)
    batch, pages_per_seq = 32, (PROMPT + NEW) // 16
    num_pages = pool_pages(config, mp, batch, pages_per_seq)
    memory = PoolManager(
        pool_layout(config, num_pages=num_pages, page_size=16, lora_modules=TARGETS, shards=mp)
    )
    for i in range(batch):  # every request at its last token, with its own adapter resident
        memory.place(f"a{i}", {m: RANK for m in TARGETS})
        memory.grow_kv(i, PROMPT + NEW)
    memory.check_invariants()


def test_slora_trace_distributions():
    n, rate, duration = 100, 8.0, 500.0
    trace = slora_trace(n, alpha=1.0, rate=rate, cv=1.0, duration=duration)
    assert len(trace) == int(rate * duration)
    adapters = np.array([r.adapter for r in trace])
    assert adapters.min() >= 0 and adapters.max() <= n - 1
    # X ~ power(1) is uniform: every tenth of the adapters gets about a tenth of the requests
    counts = np.bincount(adapters // (n // 10), minlength=10)
    assert counts.min() > 0.07 * len(trace) and counts.max() < 0.13 * len(trace)
    lens = np.array([(r.prompt_len, r.output_len) for r in trace])
    assert lens.min() >= 8 and lens.max() < 512
    gaps = np.diff([0.0] + [r.arrival for r in trace])
    assert np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / rate) < 0.1 / rate  # gamma(1/cv^2, cv^2/rate) has mean 1/rate
    assert abs(gaps.std() - 1 / rate) < 0.15 / rate  # and cv 1
    skewed = np.array([r.adapter for r in slora_trace(n, alpha=0.1, rate=rate, cv=1.0, duration=duration)])
    assert np.mean(skewed < n // 10) > 0.7  # alpha < 1 concentrates on the first adapters
    assert slora_trace(n, 1.0, rate, 1.0, 10.0) == slora_trace(n, 1.0, rate, 1.0, 10.0)  # seeded


def test_adapter_ranks_draw_from_the_set():
    ranks = adapter_ranks(1000, (8, 16, 32, 64))
    assert set(ranks) == {8, 16, 32, 64}
    assert all(150 < ranks.count(r) < 350 for r in (8, 16, 32, 64))


def test_batch_filled_tells_the_prefill_tail_from_an_under_sized_pool():
    # 32 requests prefilled 8 per step: 21 timed steps, the last three at 24, 16, 8 (H100 run, 31.62)
    assert batch_filled(664 / 21, 32)
    for held in (12, 7, 4):  # the 70B runs whose pool held fewer requests than the batch
        assert not batch_filled(held, 32)
    assert not batch_filled(None, 32)  # results from before the field existed
