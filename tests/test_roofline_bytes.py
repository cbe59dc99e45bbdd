"""The roofline's bytes: a step reads every weight but an untied embedding table (only its tokens' rows
of it), the K/V of its sequences up to each chunk's end, and each distinct adapter's pages once."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp

from bench.common import step_weight_bytes
from bench.serving import floor_bytes


def _params():
    return {
        "embed": jnp.zeros((100, 8), jnp.bfloat16),  # 1,600 bytes
        "norm": jnp.zeros((8,), jnp.bfloat16),  # 16
        "lm_head": jnp.zeros((8, 100), jnp.bfloat16),  # 1,600
        "layers": [{"w": jnp.zeros((8, 8), jnp.bfloat16)} for _ in range(2)],  # 2 x 128
    }


def test_untied_embedding_table_is_left_out():
    assert step_weight_bytes(_params(), tie_word_embeddings=False) == 16 + 1600 + 256


def test_tied_table_is_the_head_and_counted_whole():
    params = {k: v for k, v in _params().items() if k != "lm_head"}
    assert step_weight_bytes(params, tie_word_embeddings=True) == 1600 + 16 + 256


@dataclasses.dataclass
class _Chunk:
    start: int
    tokens: list
    adapter: str | None


def test_floor_counts_rows_kv_and_each_adapter_once():
    memory = SimpleNamespace(
        adapters={"a": SimpleNamespace(placement=SimpleNamespace(ranks=(8,))), "b": SimpleNamespace(placement=SimpleNamespace(ranks=(16,)))},
        adapter_pages_needed=lambda ranks: 2 * ranks[0] // 8,
    )  # fmt: skip
    chunks = [_Chunk(10, [1], "a"), _Chunk(20, [2], "a"), _Chunk(0, [3, 4, 5], "b")]
    got = floor_bytes(chunks, memory, 1000, kv_bytes_per_token=4, page_bytes=100, embed_row_bytes=16)
    # weights + 5 tokens' rows + K/V of 11 + 21 + 3 keys + pages of a (2) and b (4)
    assert got == 1000 + 5 * 16 + (11 + 21 + 3) * 4 + (2 + 4) * 100


def test_embedding_row_bytes_only_for_an_untied_table():
    from bench.common import embedding_row_bytes
    from jlora.config import PRESETS

    assert embedding_row_bytes(PRESETS["llama2-7b"]) == 4096 * 2  # untied: each token's bf16 row
    assert embedding_row_bytes(PRESETS["llama2-7b"], itemsize=4) == 4096 * 4
    assert embedding_row_bytes(SimpleNamespace(tie_word_embeddings=True, hidden_size=576)) == 0
