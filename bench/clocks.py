"""A slora run's decode outliers against the GPU's clocks: nvidia-smi's samples during the run
(`SMI=1 bash bench/device_runs.sh slora` writes them to $OUT/smi.csv) lined up with each step's end
(`per_step.end_s` of a bench.slora result). For the decode steps more than `threshold` ms over their
floor and for the others: the SM and memory clocks, power and temperature at their end, and how often
each clock-event reason (power cap, thermal, ...) was active.

python -m bench.clocks RESULT.json smi.csv
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from bench.trace_steps import outlier_steps, step_columns

# nvidia-smi's query, with TZ=UTC so that its timestamps read as UTC
SMI_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
# clocks_throttle_reasons.active bits (nvidia-smi --help-query-gpu)
REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return float("nan")


def read_smi(path: str | Path) -> dict[str, np.ndarray]:
    """nvidia-smi's CSV (SMI_FIELDS, noheader, nounits; UTC timestamps) as columns, in time order: t (Unix
    seconds), sm and mem (MHz), power (W), temp (C), reasons (bitmask). Lines that do not parse are left out."""
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6:
            continue
        try:
            when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
            reasons = int(parts[5], 16)
        except ValueError:
            continue
        t = when.replace(tzinfo=datetime.UTC).timestamp()
        rows.append((t, *(_number(p) for p in parts[1:5]), reasons))
    rows.sort()
    cols = list(zip(*rows)) if rows else [()] * 6
    names = ("t", "sm", "mem", "power", "temp")
    out = {name: np.asarray(col, float) for name, col in zip(names, cols)}
    out["reasons"] = np.asarray(cols[5], np.int64)
    return out


def sample_at(times: np.ndarray, smi: dict[str, np.ndarray], max_gap_s: float = 0.5) -> np.ndarray:
    """Index of the last sample at or before each time; -1 where there is none within max_gap_s."""
    if not len(smi["t"]):
        return np.full(len(times), -1)
    idx = np.searchsorted(smi["t"], times, side="right") - 1
    ok = (idx >= 0) & (times - smi["t"][np.clip(idx, 0, None)] <= max_gap_s)
    return np.where(ok, idx, -1)


def _summary(idx: np.ndarray, smi: dict[str, np.ndarray]) -> dict:
    idx = idx[idx >= 0]
    if not len(idx):
        return {"steps": 0}
    out = {"steps": int(len(idx))}
    for name in ("sm", "mem", "power", "temp"):
        out[f"{name}_median"] = float(np.nanmedian(smi[name][idx]))
    out["sm_min"] = float(np.nanmin(smi["sm"][idx]))
    reasons = smi["reasons"][idx]
    out["reasons"] = {name: float(np.mean((reasons & bit) != 0)) for bit, name in REASONS.items()}
    return out


def compare(run: dict, smi: dict[str, np.ndarray], threshold_ms: float = 1.0) -> dict:
    """A run's decode steps, outliers (over their floor by more than threshold_ms) and the others: the
    clocks at their end."""
    if "end_s" not in run["per_step"]:
        raise ValueError("the result's steps have no end times (end_s): run on a newer bench.serving")
    cols = step_columns(run["per_step"])
    idx = sample_at(cols["end_s"], smi)
    decode = cols["kind"] == "d"
    outlier = outlier_steps(cols, threshold_ms)
    return {
        "n": run.get("n"),
        "matched_steps": int((idx >= 0).sum()),
        "outliers": _summary(idx[outlier], smi),
        "other_decode": _summary(idx[decode & ~outlier], smi),
        "run_sm_range": [float(np.nanmin(smi["sm"])), float(np.nanmax(smi["sm"]))] if len(smi["sm"]) else [],
    }


def _line(name: str, part: dict) -> str:
    if not part["steps"]:
        return f"  {name}: no steps matched a sample"
    active = ", ".join(f"{k} {v:.2f}" for k, v in part["reasons"].items() if v > 0) or "none"
    return (
        f"  {name}: {part['steps']} steps, SM {part['sm_median']:.0f} MHz (min {part['sm_min']:.0f}), "
        f"memory {part['mem_median']:.0f} MHz, {part['power_median']:.0f} W, {part['temp_median']:.0f} C; "
        f"reasons active: {active}"
    )


def report(result_path: str, smi_path: str, threshold_ms: float = 1.0) -> list[str]:
    result = json.loads(Path(result_path).read_text())
    smi = read_smi(smi_path)
    lines = [f"{Path(result_path).name}: {len(smi['t'])} samples of the GPU's clocks"]
    for run in result["runs"]:
        cmp = compare(run, smi, threshold_ms)
        lines.append(f"n = {cmp['n']}: {cmp['matched_steps']} steps matched a sample")
        lines.append(_line(f"decode outliers (> {threshold_ms} ms over the floor)", cmp["outliers"]))
        lines.append(_line("other decode steps", cmp["other_decode"]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("smi")
    ap.add_argument("--threshold-ms", type=float, default=1.0)
    args = ap.parse_args()
    print("\n".join(report(args.result, args.smi, args.threshold_ms)))


if __name__ == "__main__":
    main()
