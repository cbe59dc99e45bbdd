"""The S-LoRA workload generator (benchmarks/trace.py in S-LoRA), reproduced.

adapter = floor(n * X), X ~ power(alpha); arrivals: gamma intervals with shape 1/cv^2 and scale
cv^2/rate; input and output lengths uniform in [lo, hi). Same draws, same order as S-LoRA's
generate_requests (numpy's legacy global generator seeded once).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    index: int
    adapter: int  # 0 .. n-1
    prompt_len: int
    output_len: int
    arrival: float  # seconds from the start


def slora_trace(
    n_adapters: int,
    alpha: float,
    rate: float,
    cv: float,
    duration: float,
    input_range: tuple[int, int] = (8, 512),
    output_range: tuple[int, int] = (8, 512),
    seed: int = 42,
) -> list[TraceRequest]:
    rng = np.random.RandomState(seed)
    total = int(rate * duration)
    adapters = (rng.power(alpha, total) * n_adapters).astype(int)
    adapters = np.minimum(adapters, n_adapters - 1)
    input_lens = rng.randint(input_range[0], input_range[1], total)
    output_lens = rng.randint(output_range[0], output_range[1], total)
    shape, scale = 1.0 / (cv * cv), cv * cv / rate
    intervals = rng.gamma(shape, scale, total)
    arrivals = np.cumsum(intervals)
    return [
        TraceRequest(i, int(adapters[i]), int(input_lens[i]), int(output_lens[i]), float(arrivals[i]))
        for i in range(total)
    ]


def adapter_ranks(n_adapters: int, ranks: tuple[int, ...], seed: int = 0) -> list[int]:
    """The rank of each adapter: drawn uniformly from `ranks` (S-LoRA's mixed-rank setting)."""
    rng = np.random.default_rng(seed)
    return [int(r) for r in rng.choice(ranks, n_adapters)]
