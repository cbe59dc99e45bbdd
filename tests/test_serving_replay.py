"""bench.serving.replay on a tiny engine: every step is recorded with its floor and host wait, the
per-step columns add up to the run's totals, and the summaries' medians and host phases are there."""

from __future__ import annotations

import time

import numpy as np
import pytest

import jlora
from bench.serving import replay
from bench.trace import TraceRequest
from tests.test_paged_engine import small_config, tiny  # noqa: F401  (the fixture)


def test_replay_records_every_step(tiny):  # noqa: F811
    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config(mixed_steps="on"))
    names = list(paths)[:3]
    for name in names:
        engine.load_adapter(name, paths[name])
    trace = [TraceRequest(i, i % 3, 5 + i, 4 + i % 3, 0.01 * i) for i in range(6)]
    out = replay(engine, trace, names, vocab=loaded.config.vocab_size, bandwidth_Bps=1e9, weight_bytes=10**6)
    assert out["completed"] == 6
    steps = out["per_step"]
    assert len(steps["kind"]) == len(steps["wall_ms"]) == out["steps"] > 0
    assert set(steps["kind"]) <= {"d", "m", "p"} and "d" in steps["kind"]
    assert sum(steps["wall_ms"]) / 1e3 == pytest.approx(out["step_wall_s"], rel=1e-3)
    assert sum(steps["floor_ms"]) / 1e3 == pytest.approx(out["roofline_s"], rel=1e-3)
    assert all(b >= 0 for b in steps["blocked_ms"])
    assert len(steps["launch_ms"]) == out["steps"] and all(t > 0 for t in steps["launch_ms"])
    ends = np.asarray(steps["end_s"])
    assert len(ends) == out["steps"] and np.all(np.diff(ends) >= 0) and abs(ends[-1] - time.time()) < 600
    decode = out["by_kind"]["decode"]
    walls = [w for k, w in zip(steps["kind"], steps["wall_ms"]) if k == "d"]
    assert decode["median_step_ms"] == pytest.approx(float(np.median(walls)), abs=2e-3)
    assert 0 <= decode["host_paced_steps"] <= decode["steps"]
    assert set(out["host_ms_per_step"]) == {"schedule", "prepare", "launch", "wait", "consume"}
    assert "profile" not in out


def test_replay_profiles_a_window(tiny):  # noqa: F811
    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config(mixed_steps="on"))
    name = next(iter(paths))
    engine.load_adapter(name, paths[name])
    trace = [TraceRequest(i, 0, 6, 60, 0.0) for i in range(3)]  # long enough to outlast the window
    out = replay(
        engine,
        trace,
        [name],
        vocab=loaded.config.vocab_size,
        bandwidth_Bps=1e9,
        weight_bytes=10**6,
        profile_window=(0.0, 0.3),
    )
    profile = out["profile"]
    assert profile["window_s"] == [0.0, 0.3]
    assert sum(k["steps"] for k in profile["by_kind"].values()) >= 1  # the steps collected in the window
    assert "kernels" in profile  # on a GPU the kernels by name; here the trace has no GPU plane


def test_cold_vs_warm_keeps_each_adapters_times_and_host_phases(tiny):  # noqa: F811
    """T7's check on a tiny engine: the adapters start off the device, each is timed cold then warm, and
    every sample keeps its rank and the host's phases up to its first token (with at least the step that
    fed the prompt)."""
    from bench.serving import cold_vs_warm

    loaded, paths, _ = tiny
    engine = jlora.Engine(loaded, small_config())
    names = list(paths)[:2]
    for name in names:
        engine.load_adapter(name, paths[name])
    assert not any(engine.paged.memory.is_resident(n) for n in names)
    out = cold_vs_warm(engine, names, vocab=loaded.config.vocab_size, prompt_len=6, ranks=[4, 8])
    assert out["samples"] == 2 and out["ttft_cold_s"] > 0 and out["ttft_warm_s"] > 0
    assert [s["rank"] for s in out["per_adapter_ms"]] == [4, 8]
    for sample in out["per_adapter_ms"]:
        for label in ("cold", "warm"):
            host = sample["host_to_first_token"][label]
            assert host["steps"] >= 1 and {"schedule", "prepare", "launch", "wait"} <= set(host)
    assert all(engine.paged.memory.is_resident(n) for n in names)


def test_mixed_step_interleave_summary_sorts_periods_by_position_after_a_chunk():
    from bench.mixed_step import interleave_summary

    kinds = ["decode", "chunk", "decode", "decode", "decode", "decode", "chunk", "decode"]
    periods = [5.0, 9.0, 6.0, 5.5, 5.1, 5.2, 11.0, 7.0]
    steps = [{"kind": k, "s": p / 1e3} for k, p in zip(kinds, periods)]
    out = interleave_summary(steps)
    assert out["chunk"]["steps"] == 2 and out["chunk"]["median_ms"] == pytest.approx(10.0)
    assert out["decode_after_1"]["steps"] == 2 and out["decode_after_1"]["median_ms"] == pytest.approx(6.5)
    assert out["decode_after_2"]["median_ms"] == pytest.approx(5.5)
    assert out["decode_later"]["steps"] == 2 and out["decode_later"]["mean_ms"] == pytest.approx(5.15)


def test_slora_row_buckets_keep_those_under_the_batch_and_the_batch():
    from bench.slora import row_buckets

    assert row_buckets("8,16,24,32", 32) == (8, 16, 24, 32)
    assert row_buckets("8,16,24,32", 16) == (8, 16)
    assert row_buckets("16,32", 8) == (8,)
    assert row_buckets("", 12) == (12,)
