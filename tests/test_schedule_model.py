"""bench.schedule_model: the host replay of slora-trace with a step-cost model."""

from __future__ import annotations

import dataclasses

from bench.schedule_model import StepCosts, replay


def _fraction(costs: StepCosts, decode_buckets: tuple[int, ...]) -> float:
    out = replay("llama2-7b", 5, 12.0, 3.0, 256, (64, 128, 192), 1, costs, decode_buckets=decode_buckets)
    return out["roofline_fraction"]


def test_padded_decode_rows_cost_only_when_priced():
    """With pad_row_us 0 the decode buckets change nothing; priced, finer buckets pad fewer rows and the
    modelled trace gets closer to its floor, and every step still takes at least its floor."""
    free = StepCosts()
    assert _fraction(free, (16, 32)) == _fraction(free, (8, 16, 24, 32))
    priced = dataclasses.replace(free, pad_row_us=20.0)
    coarse, fine = _fraction(priced, (16, 32)), _fraction(priced, (8, 16, 24, 32))
    assert coarse < fine < _fraction(free, (16, 32)) <= 1.0
