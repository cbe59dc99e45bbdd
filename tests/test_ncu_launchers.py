"""bench.kernels.attention_once / sgmv_once / lora_once (the launches an ncu profile reads): on this CPU,
interpreted, each configuration runs and its result matches the reference; the attention case can put
its pool past 4 GB's worth of layers (here: past one layer) and read the last."""

from __future__ import annotations

import json
import sys

import pytest

from bench.kernels import attention_once, lora_once, sgmv_once


def _run(module, argv: list[str], capsys) -> list[dict]:
    old = sys.argv
    sys.argv = [module.__name__, *argv]
    try:
        module.main()
    finally:
        sys.argv = old
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_attention_once_checks_each_configuration(capsys):
    rows = _run(
        attention_once,
        ["--batch", "4", "--context", "128", "--trace-rows", "3", "--layers", "2", "--implementation",
         "interpret", "--calls", "1", "--tunables", '{};{"small_split_keys": 32, "pages_per_block": 1}'],
        capsys,
    )  # fmt: skip
    assert [r["pages_per_block"] for r in rows] == [4, 1]
    assert all(r["max_abs_err"] < 0.05 for r in rows)  # bf16 outputs against the reference


def test_attention_once_reads_tunables_from_a_file(tmp_path):
    path = tmp_path / "sets.txt"
    path.write_text('{"num_warps": 8};{}\n')
    got = attention_once.parse_tunables(f"@{path}")
    assert [t.num_warps for t in got] == [8, 4]
    with pytest.raises(TypeError):
        attention_once.parse_tunables('{"no_such_field": 1}')


def test_sgmv_once_checks_each_configuration(capsys):
    rows = _run(
        sgmv_once,
        ["--decodes", "3", "--chunk", "32", "--rank", "16", "--implementation", "interpret",
         "--fields", '{};{"sgmv_max_splits": 1}'],
        capsys,
    )  # fmt: skip
    assert [r["sgmv_max_splits"] for r in rows] == [0, 1]  # 35 tokens: the small tier
    assert all(r["max_abs_err"] < 0.05 for r in rows)


def test_lora_once_runs_each_configuration(capsys, monkeypatch):
    from bench.kernels import lora as bench_lora

    monkeypatch.setattr(bench_lora, "KERNEL_IMPL", "interpret")
    rows = _run(lora_once, ["--tokens", "3", "--ranks", "16,16", "--fields", '{};{"num_warps": 2}'], capsys)
    assert [r["num_warps"] for r in rows] == [1, 2]
    assert all(r["max_abs_err"] < 0.05 for r in rows)  # bf16 deltas against the reference
