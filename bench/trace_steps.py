"""Where a slora-trace run's step time goes beyond its floor, from the steps it recorded one by one
(`per_step` in each run of a bench.slora result): decode steps by batch size, the outliers (decode steps
far above their floor) and when in the run they came, and the run's roofline with those outliers at the
median excess instead.

python -m bench.trace_steps bench/results/slora-trace-llama2-7b-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BANDS = ((1, 8), (9, 16), (17, 24), (25, 32))  # decode rows: 16 and 32 are the engine's decode buckets


def step_columns(per_step: dict) -> dict[str, np.ndarray]:
    """per_step's columns as arrays (kind as one letter a step)."""
    out = {k: np.asarray(v, dtype=float) for k, v in per_step.items() if k != "kind"}
    out["kind"] = np.asarray(list(per_step["kind"]))
    return out


def step_bands(cols: dict[str, np.ndarray], kind: str, bands) -> list[dict]:
    """Steps of one kind ("d", "m") by their tokens, one row per (lo, hi) band holding any: the band,
    steps, mean and median wall and floor (ms), floor fraction, seconds above the floor."""
    rows = []
    for lo, hi in bands:
        mine = (cols["kind"] == kind) & (cols["tokens"] >= lo) & (cols["tokens"] <= hi)
        if not mine.any():
            continue
        wall, floor = cols["wall_ms"][mine], cols["floor_ms"][mine]
        rows.append(
            {
                "band": f"{lo}-{hi}" if hi < 10**6 else f"{lo}+",
                "steps": int(mine.sum()),
                "wall_ms": float(wall.mean()),
                "floor_ms": float(floor.mean()),
                "median_wall_ms": float(np.median(wall)),
                "median_floor_ms": float(np.median(floor)),
                "fraction": float(floor.sum() / wall.sum()),
                "excess_s": float((wall - floor).sum() / 1e3),
            }
        )
    return rows


def decode_bands(cols: dict[str, np.ndarray], bands=BANDS) -> list[dict]:
    """Decode steps by rows (step_bands)."""
    return step_bands(cols, "d", bands)


def outlier_steps(cols: dict[str, np.ndarray], threshold_ms: float = 1.0) -> np.ndarray:
    """Which steps are decode outliers: decode steps more than threshold_ms above their floor."""
    return (cols["kind"] == "d") & (cols["wall_ms"] - cols["floor_ms"] > threshold_ms)


def outliers(cols: dict[str, np.ndarray], threshold_ms: float = 1.0, bins_s: float = 2.0) -> dict:
    """Decode steps more than threshold_ms above their floor: how many, the seconds they spend above the
    decode steps' median excess, when they came (counts per bins_s of step time), and the run's roofline
    as run and with them at the median excess."""
    wall, floor = cols["wall_ms"], cols["floor_ms"]
    excess = wall - floor
    decode = cols["kind"] == "d"
    median = float(np.median(excess[decode])) if decode.any() else 0.0
    mine = outlier_steps(cols, threshold_ms)
    capped = wall.copy()
    capped[mine] = floor[mine] + median
    at = np.cumsum(wall) / 1e3  # when each step ended, in seconds of step time
    edges = np.arange(0.0, at[-1] + bins_s, bins_s) if len(at) else np.array([0.0, bins_s])
    waits = {}
    if mine.any() and (decode & ~mine).any():
        # blocked: the host's wait on a step - longer than on the others when the device itself took
        # longer (it asked at the usual time); no longer when the host launched late (then the step's
        # wall counts the launch call, not the device's idle time before it). launch: the launch call's
        # host time, where XLA updates the step's command buffer
        for column, key in (("blocked_ms", "blocked"), ("launch_ms", "launch")):
            if column in cols:
                waits[f"{key}_median_ms"] = float(np.median(cols[column][mine]))
                waits[f"others_{key}_median_ms"] = float(np.median(cols[column][decode & ~mine]))
    return {
        **waits,
        "threshold_ms": threshold_ms,
        "steps": int(mine.sum()),
        "median_excess_ms": median,
        "seconds_above_median": float((excess[mine] - median).sum() / 1e3),
        "by_time": np.histogram(at[mine], bins=edges)[0].tolist(),
        "roofline": float(floor.sum() / wall.sum()),
        "roofline_without": float(floor.sum() / capped.sum()),
    }


CHUNK_BANDS = ((1, 99), (100, 159), (160, 229), (230, 10**6))  # a chunk step's tokens, decode rows included


def chunk_bands(cols: dict[str, np.ndarray], bands=CHUNK_BANDS) -> list[dict]:
    """Steps that carry prompt chunks by their tokens, the 64 / 128 / 192 / 256 chunk buckets plus the
    decode rows (step_bands)."""
    return step_bands(cols, "m", bands)


def recount_floor(result: dict, cols: dict[str, np.ndarray]) -> bool:
    """A result written before the floor left out an untied embedding table (no `floor_weights` key):
    cols' floor_ms recounted as bench.serving.floor_bytes counts now - less the table once a step, plus
    each token's row. True if recounted."""
    if result.get("floor_weights") == "step":
        return False
    from bench.common import embedding_row_bytes
    from jlora.config import PRESETS

    config = PRESETS.get(result.get("workload", {}).get("model", ""))
    if config is None or config.tie_word_embeddings:
        return False
    row_bytes = embedding_row_bytes(config)  # the bf16 models of these runs
    bps = result["bandwidth"]["copy_TBps"] * 1e12
    cols["floor_ms"] = (
        cols["floor_ms"] + (cols["tokens"] * row_bytes - config.vocab_size * row_bytes) / bps * 1e3
    )
    return True


def report(path: str, threshold_ms: float = 1.0) -> list[str]:
    result = json.loads(Path(path).read_text())
    lines = [f"{Path(path).name} ({result.get('commit', '?')[:9]}, {result.get('device', '?')})"]
    for run in result.get("runs", []):
        if "per_step" not in run:
            lines.append(
                f"  n = {run['n']}: no per-step record (a result from before bench.serving kept one)"
            )
            continue
        cols = step_columns(run["per_step"])
        recorded = float(cols["floor_ms"].sum() / cols["wall_ms"].sum())
        recounted = recount_floor(result, cols)
        out = outliers(cols, threshold_ms)
        note = f" (recounted without the embedding table; {recorded:.3f} as recorded)" if recounted else ""
        lines.append(
            f"  n = {run['n']}: roofline {out['roofline']:.3f}{note}; {out['steps']} decode steps > {threshold_ms} ms "
            f"over their floor, {out['seconds_above_median']:.2f} s above the median excess "
            f"({out['median_excess_ms']:.2f} ms) -> {out['roofline_without']:.3f} without them; "
            f"decode outliers by 2 s of the run: {out['by_time']}"
        )
        if "blocked_median_ms" in out:
            lines.append(
                f"    the host waited {out['blocked_median_ms']:.2f} ms (median) on the outliers, "
                f"{out['others_blocked_median_ms']:.2f} on the other decode steps"
                + (
                    f"; their launch calls took {out['launch_median_ms']:.2f} ms against "
                    f"{out['others_launch_median_ms']:.2f}"
                    if "launch_median_ms" in out
                    else ""
                )
            )
        mixed = cols["kind"] == "m"
        if mixed.any():
            wall, floor = cols["wall_ms"][mixed], cols["floor_ms"][mixed]
            lines.append(
                f"    chunk steps: {int(mixed.sum())} steps, {wall.mean():.2f} ms (floor {floor.mean():.2f}), "
                f"fraction {floor.sum() / wall.sum():.3f}, {(wall - floor).sum() / 1e3:.2f} s over"
            )
        for band in chunk_bands(cols):
            lines.append(
                f"      {band['band']:>8} tokens: {band['steps']:4d} steps, median {band['median_wall_ms']:.2f} ms "
                f"(floor {band['median_floor_ms']:.2f}), {band['excess_s']:.2f} s over"
            )
        for band in decode_bands(cols):
            lines.append(
                f"    decode rows {band['band']:>5}: {band['steps']:5d} steps, {band['wall_ms']:.2f} ms "
                f"(floor {band['floor_ms']:.2f}), fraction {band['fraction']:.3f}, {band['excess_s']:.2f} s over"
            )
    return lines


def main() -> None:
    for path in sys.argv[1:]:
        print("\n".join(report(path)))


if __name__ == "__main__":
    main()
