"""bench.trace_steps on a made-up per-step record whose figures are known."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

from bench.trace_steps import chunk_bands, decode_bands, outliers, report, step_columns


def record() -> dict:
    # 10 decode steps of 4 rows and 10 of 20, 5.0 ms floors, 0.5 ms over; two decode outliers 4 ms
    # over (the 3rd and the 15th); two chunk steps of 9 ms on 5 ms floors
    kind = "d" * 20 + "mm"
    tokens = [4] * 10 + [20] * 10 + [200, 200]
    floor = [5.0] * 22
    wall = [5.5] * 20 + [9.0, 9.0]
    wall[2] = wall[14] = 9.0
    return {
        "kind": kind,
        "tokens": tokens,
        "adapters": [1] * 22,
        "wall_ms": wall,
        "floor_ms": floor,
        "blocked_ms": [3.0, 3.0, 6.5] + [3.0] * 11 + [6.0] + [3.0] * 7,
    }


def test_decode_bands_split_by_rows():
    bands = decode_bands(step_columns(record()))
    assert [b["band"] for b in bands] == ["1-8", "17-24"]
    assert [b["steps"] for b in bands] == [10, 10]
    assert bands[0]["wall_ms"] == pytest.approx((9 * 5.5 + 9.0) / 10)
    assert bands[1]["excess_s"] == pytest.approx((9 * 0.5 + 4.0) / 1e3)
    assert bands[0]["fraction"] == pytest.approx(50.0 / (9 * 5.5 + 9.0))


def test_outliers_counted_and_capped_at_the_median_excess():
    cols = step_columns(record())
    out = outliers(cols, threshold_ms=1.0, bins_s=0.05)
    assert out["steps"] == 2
    assert out["median_excess_ms"] == pytest.approx(0.5)
    assert out["seconds_above_median"] == pytest.approx(2 * 3.5 / 1e3)
    wall = np.asarray(record()["wall_ms"])
    assert out["roofline"] == pytest.approx(110.0 / wall.sum())
    assert out["roofline_without"] == pytest.approx(110.0 / (wall.sum() - 7.0))
    assert sum(out["by_time"]) == 2 and out["by_time"][0] == 1  # the 3rd step ends in the first 50 ms
    assert out["blocked_median_ms"] == pytest.approx(6.25) and out["others_blocked_median_ms"] == 3.0
    assert "launch_median_ms" not in out  # a result from before the launch call was recorded
    rec = record()
    rec["launch_ms"] = [1.0, 1.0, 3.0] + [1.0] * 11 + [2.0] + [1.0] * 7
    out = outliers(step_columns(rec))
    assert out["launch_median_ms"] == pytest.approx(2.5) and out["others_launch_median_ms"] == 1.0


def test_chunk_bands_split_by_tokens():
    rec = record()
    rec["tokens"][-1] = 90
    bands = chunk_bands(step_columns(rec))
    assert [b["band"] for b in bands] == ["1-99", "160-229"]
    assert [b["steps"] for b in bands] == [1, 1]
    assert bands[0]["excess_s"] == pytest.approx(4.0 / 1e3) and bands[1]["median_wall_ms"] == 9.0


def test_report_reads_a_result_file(tmp_path):
    path = tmp_path / "slora.json"
    path.write_text(
        json.dumps({"commit": "abc", "device": "cpu", "runs": [{"n": 5, "per_step": record()}, {"n": 9}]})
    )
    lines = report(str(path))
    assert "n = 5: roofline" in lines[1] and "2 decode steps > 1.0 ms" in lines[1]
    assert any("chunk steps: 2 steps" in line for line in lines)
    assert any("160-229 tokens:    2 steps" in line for line in lines)
    assert any("waited 6.25 ms (median) on the outliers, 3.00" in line for line in lines)
    assert "no per-step record" in lines[-1]


def test_floor_recounted_without_the_embedding_table_for_older_results():
    """A Llama-2-7B result written before the floor left out its untied embedding table (32,000 x 4,096
    bf16: 262 MB) is recounted: less the table once a step, plus each token's 8 KB row; a result that
    says its floor counts a step's weights, or a model with no preset here (SmolLM2: tied), is read as
    recorded."""
    from bench.trace_steps import recount_floor

    old = {"workload": {"model": "llama2-7b"}, "bandwidth": {"copy_TBps": 1.0}}
    cols = step_columns(record())
    assert recount_floor(old, cols)
    want = 5.0 + (np.asarray(record()["tokens"]) * 8192 - 32000 * 8192) / 1e12 * 1e3
    np.testing.assert_allclose(cols["floor_ms"], want)
    for result in ({**old, "floor_weights": "step"}, {**old, "workload": {"model": "smollm2-135m"}}):
        cols = step_columns(record())
        assert not recount_floor(result, cols)
        np.testing.assert_array_equal(cols["floor_ms"], 5.0)


def test_clocks_line_up_outliers_with_the_gpu_samples(tmp_path):
    """bench.clocks: nvidia-smi's UTC samples matched to each step's end; the decode outliers, which ran in
    a stretch of lower SM clock under the power cap, read that clock and reason, the others do not."""
    from bench.clocks import compare, read_smi, report, sample_at

    t0 = 1_780_000_000.0  # 2026-05-28
    lines = ["garbage line", "2026/05/28 00:00:00.000, [N/A], 1, 2, 3, 0x0"]  # unparsable, then a [N/A]
    for i in range(40):  # 0.1 s apart; from 1.0 to 2.0 s the SM clock drops under the power cap
        t = datetime.datetime.fromtimestamp(t0 + 0.1 * i, datetime.UTC).strftime("%Y/%m/%d %H:%M:%S.%f")
        low = 10 <= i < 20
        sm, reason = (1500, "0x0000000000000004") if low else (1980, "0x0000000000000000")
        lines.append(f"{t[:-3]}, {sm}, 3201, {690 if low else 520}, 50, {reason}")
    smi_path = tmp_path / "smi.csv"
    smi_path.write_text("\n".join(lines) + "\n")
    smi = read_smi(smi_path)
    assert len(smi["t"]) == 41 and np.isnan(smi["sm"][0])
    assert list(sample_at(np.array([t0 - 5, t0 + 0.15, t0 + 60]), smi)) == [
        -1,
        2,
        -1,
    ]  # none / 2nd / too late
    ends = t0 + 0.05 + 0.1 * np.arange(36)
    slow = (ends > t0 + 1.0) & (ends < t0 + 2.0)
    run = {
        "n": 5,
        "per_step": {
            "kind": "d" * 30 + "m" * 6,
            "wall_ms": list(np.where(slow, 7.5, 5.8)),
            "floor_ms": [5.5] * 36,
            "end_s": list(ends),
        },
    }
    cmp = compare(run, smi)
    assert cmp["outliers"]["steps"] == 10 and cmp["other_decode"]["steps"] == 20
    assert cmp["outliers"]["sm_median"] == 1500 and cmp["other_decode"]["sm_median"] == 1980
    assert (
        cmp["outliers"]["reasons"]["sw_power_cap"] == 1.0
        and cmp["other_decode"]["reasons"]["sw_power_cap"] == 0
    )
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"runs": [run]}))
    text = "\n".join(report(str(result), str(smi_path)))
    assert "SM 1500 MHz" in text and "sw_power_cap 1.00" in text
    with pytest.raises(ValueError, match="end_s"):
        compare({"per_step": {"kind": "d", "wall_ms": [1.0], "floor_ms": [1.0]}}, smi)
