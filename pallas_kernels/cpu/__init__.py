"""CPU kernels (C++ through XLA's FFI) for what XLA's own CPU code does slowly.

panel_matmul: x @ W with W stored as column panels (pack_panels). A decode step multiplies a few rows
by every weight, once: the time is the weights' bytes over memory bandwidth, and a contiguous panel
stream with prefetch reaches ~22 GB/s on the 2-core dev CPU where XLA's GEMM (it packs W first) reaches
~13. Larger row counts (prefill chunks) run as fast as XLA's. The C++ is compiled on first use
(build.py); without a compiler, or off the CPU, the pure-jnp reference runs instead.

bgmv_group: the decode LoRA (pallas_kernels.lora's BGMV) reading adapter rows in place from the
unified pool, where XLA gathers them into new arrays, dots them and scatter-adds the result.

decode_attention: paged attention for one query per sequence, reading K/V pages in place.
"""

from __future__ import annotations

from pallas_kernels.cpu.attention import decode_attention, decode_attention_supported
from pallas_kernels.cpu.bgmv import bgmv_group, bgmv_supported
from pallas_kernels.cpu.build import kernel_available
from pallas_kernels.cpu.panel import PANEL, pack_panels, panel_matmul
from pallas_kernels.cpu.reference import panel_matmul_reference

__all__ = [
    "PANEL",
    "bgmv_group",
    "bgmv_supported",
    "decode_attention",
    "decode_attention_supported",
    "kernel_available",
    "pack_panels",
    "panel_matmul",
    "panel_matmul_reference",
]
