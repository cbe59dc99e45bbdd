"""CPU kernels (C++ through XLA's FFI) for what XLA's own CPU code does slowly.

panel_matmul: x @ W with W stored as column panels (pack_panels). A decode step multiplies a few rows
by every weight, once: the time is the weights' bytes over memory bandwidth, and a contiguous panel
stream with prefetch reaches ~22 GB/s on the 2-core dev CPU where XLA's GEMM (it packs W first) reaches
~13. Larger row counts (prefill chunks) run as fast as XLA's. The C++ is compiled on first use
(build.py); without a compiler, or off the CPU, the pure-jnp reference runs instead.

bgmv_group, sgmv: the decode and prefill LoRA (pallas_kernels.lora's BGMV and SGMV) reading adapter
rows in place from the unified pool, where XLA gathers them into new arrays, dots them and
scatter-adds the result.

paged_attention: decode and prefill attention over the pool's pages, read in place.
"""

from __future__ import annotations

from pallas_kernels.cpu.attention import attention_supported, paged_attention
from pallas_kernels.cpu.build import kernel_available
from pallas_kernels.cpu.lora import bgmv_group, lora_supported, sgmv
from pallas_kernels.cpu.panel import PANEL, pack_panels, panel_matmul
from pallas_kernels.cpu.reference import panel_matmul_reference

__all__ = [
    "PANEL",
    "bgmv_group",
    "attention_supported",
    "kernel_available",
    "lora_supported",
    "pack_panels",
    "panel_matmul",
    "panel_matmul_reference",
    "paged_attention",
    "sgmv",
]
