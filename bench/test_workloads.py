"""The benchmark drivers' own arithmetic, collected by `make test` (pyproject testpaths; tests/ never
imports bench): the S-LoRA trace's distributions, and decode_7b's pool holding a full batch (32
requests' whole KV and 32 distinct adapters at once) for every geometry and model-parallel degree it
is run at. An under-sized pool once ran the Llama-2-70B geometry at 12/7/4 requests per step while
reporting batch 32. And the schedule model's replay (schedule_model.py) charging what it models."""

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


def test_slora_partial_file_is_finished_with_the_runs_own_record(tmp_path, monkeypatch):
    """A GPU slora run stopped at its time limit keeps its finished runs in its --partial file;
    `bench.slora --finish` writes them as the result with that run's device, date, commit and
    command, not this machine's, and with T4 over the runs."""
    import json
    import types

    import bench.common
    from bench.slora import finish, make_payload

    monkeypatch.setattr(bench.common, "RESULTS", str(tmp_path))
    pct = {"mean": 0.2, "p50": 0.1, "p99": 0.9}

    def run(n, roofline):
        return {
            "n": n,
            "rate": 8.0,
            "throughput_req_s": 6.4,
            "throughput_tok_s": 1660.0,
            "ttft_s": pct,
            "tpot_s": pct,
            "e2e_s": pct,
            "slo_attainment": 1.0,
            "roofline_fraction": roofline,
            "adapter_loads": n,
        }

    args = types.SimpleNamespace(
        model="llama2-7b", rate=8.0, cv=1.0, alpha=1.0, duration=20.0, input=(8, 512), output=(8, 512),
        batch=32, pages=3000, impl="auto", layer_loop="unrolled", mixed_steps="auto", chunk=256,
        chunk_buckets=(128, 256), prefill_seqs=1, rows_in_place="mixed", materialize_norms="off", attention_tunables=None,
        command_buffer_scheduling="auto",
        lora_fields=None, decode_buckets="8,16,24,32", mixed_decode_buckets="16,32",
    )  # fmt: skip
    recorded = {"device": "gpu: NVIDIA H100 80GB HBM3", "date": "2026-11-26T08:45:59+00:00"}
    recorded |= {"commit": "76c12a1", "command": "python3 -m bench.slora --partial p.json"}
    partial = tmp_path / "p.json"
    runs = [run(5, 0.53), run(2000, 0.56)]
    partial.write_text(json.dumps({**recorded, **make_payload(args, {"copy_TBps": 2.9}, 1, 9.0, runs)}))
    finish(str(partial))
    [result] = [p for p in tmp_path.glob("slora-trace-llama2-7b-*.json")]
    out = json.loads(result.read_text())
    assert out["device"] == recorded["device"] and out["commit"] == "76c12a1"
    assert out["workload"]["chunk_buckets"] == [128, 256] and out["workload"]["prefill_seqs"] == 1
    assert out["workload"]["attention_tunables_used"]["pages_per_block"] >= 1  # the shapes the run used
    assert out["date"] == recorded["date"] and out["command"].startswith(recorded["command"])
    assert [r["n"] for r in out["runs"]] == [5, 2000]
    assert out["T4"] == {"roofline_fraction_min": 0.53, "slo_at_largest_n": 1.0, "met": False}
    assert list(tmp_path.glob("slora-trace-llama2-7b-*-adapters.png"))
    assert out["workload"]["decode_buckets"] == [8, 16, 24, 32]  # the row buckets under --batch 32
    smaller = types.SimpleNamespace(**{**vars(args), "batch": 16})
    workload = make_payload(smaller, {"copy_TBps": 2.9}, 1, 9.0, runs)["workload"]
    assert workload["decode_buckets"] == (8, 16) and workload["mixed_decode_buckets"] == (16,)


def _fake_trace(monkeypatch, tmp_path):
    """A trace file whose GPU plane has an "XLA Ops" line with more events than the kernel stream, a
    module line, numbered copies of one kernel, and a CPU plane that must be ignored."""
    import types

    import jax.profiler

    ev = lambda name, start, dur: types.SimpleNamespace(name=name, start_ns=start, duration_ns=dur)  # noqa: E731
    line = lambda name, events: types.SimpleNamespace(name=name, events=events)  # noqa: E731
    stream = [ev("bgmv_shrink", 0, 2000), ev("bgmv_expand.3", 2000, 3000), ev("bgmv_expand_1", 6000, 1000)]
    gpu = types.SimpleNamespace(
        name="/device:GPU:0",
        lines=[
            line("XLA Ops", [ev(f"op{i}", i, 1) for i in range(10)]),
            line("XLA Modules", [ev("jit_run", 0, 9000)]),
            line("Stream #14(Compute)", stream),
        ],
    )
    cpu = types.SimpleNamespace(name="/host:CPU", lines=[line("python", [ev("x", 0, 10**9)] * 20)])
    (tmp_path / "t.xplane.pb").write_bytes(b"")
    monkeypatch.setattr(
        jax.profiler.ProfileData,
        "from_file",
        staticmethod(lambda path: types.SimpleNamespace(planes=[cpu, gpu])),
    )


def test_trace_reading_finds_the_kernel_stream(monkeypatch, tmp_path):
    """bench.profile's trace reading (decode_7b --profile and the kernel bench's device times): the
    kernels are the busiest stream, not the HLO-op or module lines; numbered copies fold together."""
    from bench.profile import busiest_stream, gpu_lines, host_breakdown, kernel_breakdown

    assert gpu_lines(str(tmp_path)).startswith("no trace")
    _fake_trace(monkeypatch, tmp_path)
    lines, spans, n_gpus = gpu_lines(str(tmp_path))
    assert busiest_stream(lines) == "Stream #14(Compute)" and n_gpus == 1
    assert dict(lines["Stream #14(Compute)"]) == {"bgmv_shrink": [0.002, 1], "bgmv_expand": [0.004, 2]}
    out = kernel_breakdown(str(tmp_path), steps=1)
    assert out["kernel_line"] == "Stream #14(Compute)"
    assert out["device_busy_ms_per_step"] == pytest.approx(0.006)
    assert out["idle_ms_per_step_in_step_gaps"] == pytest.approx(0.001)  # 5000 -> 6000 ns
    host = host_breakdown(str(tmp_path), steps=2)  # the host plane only, per step
    assert [row["event"] for row in host["top"]] == ["python | x"]
    assert host["top"][0]["ms_per_step"] == pytest.approx(10_000.0) and host["top"][0]["calls_per_step"] == 10


def test_by_kind_splits_steps_and_their_roofline():
    from bench.serving import by_kind

    steps = [
        {"kind": "decode", "wall": 0.010, "bytes": 8e9, "tokens": 30},
        {"kind": "decode", "wall": 0.010, "bytes": 8e9, "tokens": 32},
        {"kind": "mixed", "wall": 0.040, "bytes": 16e9, "tokens": 288, "prompts": 1},
        {"kind": "mixed", "wall": 0.080, "bytes": 16e9, "tokens": 288, "prompts": 2},
    ]
    out = by_kind(steps, bandwidth_Bps=1e12)
    assert set(out) == {"decode", "mixed"}
    assert out["decode"]["steps"] == 2 and abs(out["decode"]["mean_step_ms"] - 10.0) < 1e-9
    assert abs(out["decode"]["roofline_fraction"] - 0.8) < 1e-9 and "by_prompts" not in out["decode"]
    assert abs(out["mixed"]["roofline_fraction"] - 32 / 120) < 1e-9 and out["mixed"]["mean_tokens"] == 288
    by_prompts = out["mixed"]["by_prompts"]
    assert set(by_prompts) == {"1", "2"} and by_prompts["2"]["steps"] == 1
    assert abs(by_prompts["1"]["roofline_fraction"] - 0.4) < 1e-9
    assert abs(by_prompts["2"]["mean_step_ms"] - 80.0) < 1e-9


def test_cpu_matmul_floor_times_the_engines_fused_matmuls():
    """The T8 ceiling times the matmuls the engine runs: its fused layer's kernels, in order."""
    import jax

    from bench.cpu_matmul_floor import shapes
    from jlora.config import PRESETS
    from jlora.model.llama import random_params
    from jlora.model.paged import fuse_layer, unstack_layers

    config = PRESETS["tiny"]
    layer = unstack_layers(random_params(config, jax.random.PRNGKey(0)))["layers"][0]
    fused = fuse_layer(layer)
    kernels = [fused[m]["kernel"].shape for m in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    assert kernels == shapes(config)


def test_cpu_smol_agreement_counts_identical_runs_and_shared_prefixes():
    from bench.cpu_smol import agreement

    got = agreement([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 3], [4, 0, 6], [0, 8, 9]])
    assert got == {"sequences_identical": 1, "mean_shared_prefix": round((3 + 1 + 0) / 3, 1)}


def test_schedule_model_charges_what_it_models():
    """The host replay of the trace: with no cost for prompt chunks every step runs at decode_share of
    its floor, so the trace does too; chunk buckets under the budget compute fewer padded rows than one
    256-token bucket for up to four prompts, and the padded rows cost time."""
    from bench.schedule_model import StepCosts, replay

    flat = StepCosts(chunk_fixed_ms=0.0, row_us=0.0, decode_share=0.8)
    out = replay("llama2-7b", 100, 12.0, 5.0, 256, (), 4, flat)
    assert abs(out["roofline_fraction"] - 0.8) < 1e-9
    assert out["by_kind"]["decode"]["steps"] > 0 and out["by_kind"]["mixed"]["steps"] > 0
    padded = replay("llama2-7b", 100, 12.0, 5.0, 256, (), 4, StepCosts())
    bucketed = replay("llama2-7b", 100, 12.0, 5.0, 256, (64, 128, 192), 1, StepCosts())
    assert bucketed["by_kind"]["mixed"]["mean_rows"] < padded["by_kind"]["mixed"]["mean_rows"]
    assert bucketed["by_kind"]["mixed"]["mean_step_ms"] < padded["by_kind"]["mixed"]["mean_step_ms"]


def test_step_summary_sums_the_lora_launches():
    """bench.step_summary: a mixed-step result's medians, floor fractions and LoRA launches a step (the
    BGMV, SGMV, by-adapter and mixed-step one-launch kernels, not the others)."""
    from bench.step_summary import summary_row, table

    top = [
        {"kernel": "gemm_fusion_dot", "ms_per_step": 3.4},
        {"kernel": "bgmv_expand", "ms_per_step": 0.25},
        {"kernel": "bgmv_by_adapter_shrink", "ms_per_step": 0.05},
        {"kernel": "sgmv_shrink_", "ms_per_step": 0.15},
        {"kernel": "mixed_lora_expand_add", "ms_per_step": 0.1},
    ]
    result = {
        "name": "mixed-step-args-0",
        "workload": {"lora_fields": '{"by_adapter_min_rank":64}', "adapter_ranks": [64, 16, 64, 32]},
        "decode": {"median_ms": 5.5, "roofline_fraction": 0.97},
        "chunk": {"median_ms": 8.2, "roofline_fraction": 0.6},
        "decode_profile": {"top": top[:3]},
        "profile": {"top": top},
    }
    row = summary_row(result)
    assert row["decode_lora_ms"] == pytest.approx(0.30) and row["chunk_lora_ms"] == pytest.approx(0.55)
    assert row["varied"] == '{"by_adapter_min_rank":64}' and row["decode_ms"] == 5.5
    assert row["ranks"] == "16,32,64" and row["name"] == "mixed-step-args-0"
    without = summary_row({"name": "n", "decode": {"median_ms": 1.0}})
    assert without["decode_lora_ms"] is None and without["chunk_ms"] is None
    assert "0.300" in table([row]) and " - " in table([without])


def test_slora_repeats_give_t4_by_mean_and_in_every_replay():
    """bench.slora --repeats: each replay's figures (its decode outliers counted from its steps), and T4 by
    the mean of each n's replays and in every replay; nothing without repeats."""
    from bench.slora import repeat_summary, repeats_record

    def replay(fraction, walls):
        return {
            "roofline_fraction": fraction,
            "slo_attainment": 1.0,
            "throughput_tok_s": 1600.0,
            "step_wall_s": 22.0,
            "per_step": {"kind": "ddmd", "wall_ms": walls, "floor_ms": [5.5] * 4},
        }

    one = repeat_summary(replay(0.91, [5.8, 7.0, 9.0, 5.6]))
    assert one["decode_outliers"] == 1 and one["roofline_fraction"] == 0.91  # the chunk step is not counted
    runs = [
        {"n": 5, "repeats": [repeat_summary(replay(f, [5.8] * 4)) for f in (0.91, 0.895, 0.905)]},
        {"n": 100, "repeats": [repeat_summary(replay(f, [5.8] * 4)) for f in (0.92, 0.91, 0.93)]},
    ]
    rec = repeats_record(runs)
    assert rec["roofline_fraction_repeats"] == {"5": [0.91, 0.895, 0.905], "100": [0.92, 0.91, 0.93]}
    assert rec["met_by_mean_of_repeats"] and not rec["met_in_every_repeat"]
    assert repeats_record([{"n": 5}]) == {} and repeats_record([]) == {}
