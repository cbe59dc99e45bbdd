"""Padding sizes: request lengths never reach traced shapes, only these buckets do."""

from __future__ import annotations


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()
