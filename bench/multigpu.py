"""Tensor-parallel scaling (issue 9): gather decode-7b results run at several --mp on one machine into
one summary (tok/s, step time, speed-up over mp=1, share of step time in collectives) and a PNG.

python -m bench.multigpu RESULT.json [RESULT.json ...]   (decode_7b.py outputs with --mp and --profile)
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any

from bench.common import RESULTS, batch_filled, write_result


def row(path: str) -> dict[str, Any]:
    with open(path) as f:
        r = json.load(f)
    w, run = r["workload"], r["jlora"]["mixed"]
    prof = r.get("profile", {}).get("mixed", {})
    step = run["decode_step_ms"]
    named = prof.get("collective_ms_per_step", 0.0)
    # XLA runs its asynchronous collectives on side compute streams; this trace names only the kernels
    # of the main stream, so the side streams' time is the upper bound of what collectives can take
    side = sum(v for k, v in prof.get("lines", {}).items() if "Compute" in k and k != prof.get("kernel_line"))
    if "devices_traced" not in prof and w["mp"] > 1:
        # profiles before commit 712adc1 merged the devices' stream lines: another device's main stream
        # (as long as the step's busy time) is dropped, and the side streams are split between devices
        side = sum(
            v
            for k, v in prof.get("lines", {}).items()
            if "Compute" in k
            and k != prof.get("kernel_line")
            and v < 0.5 * prof.get("device_busy_ms_per_step", 0)
        )
        side /= w["mp"]
    return {
        "file": os.path.basename(path),
        "device": r["device"],
        "commit": r["commit"],
        "geometry": w["geometry"],
        "layers": w["layers"],
        "mp": w["mp"],
        "batch": w["batch"],
        "decode_step_ms": step,
        "decode_tok_s": run["decode_tok_s"],
        # requests per timed decode step (results before this field existed: unknown)
        "mean_decode_rows": run.get("mean_decode_rows"),
        "tok_s_end_to_end": run["tok_s_end_to_end"],
        "roofline_fraction": run["roofline_fraction"],
        "device_busy_ms": prof.get("device_busy_ms_per_step"),
        "collective_ms_named": named,
        "collective_share_named": named / step,
        "side_stream_ms": side,
        "collective_share_upper": (named + side) / step,
    }


def summarize(paths: list[str]) -> dict[str, Any]:
    rows = sorted((row(p) for p in paths), key=lambda r: (r["geometry"], r["mp"]))
    by_geom: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        by_geom[r["geometry"]].append(r)
    for group in by_geom.values():
        one = next((r for r in group if r["mp"] == 1), None)
        for r in group:
            r["speedup_over_mp1"] = one["decode_step_ms"] / r["decode_step_ms"] if one else None
            r["scaling_efficiency"] = r["speedup_over_mp1"] / r["mp"] if one else None
    return {"rows": rows}


def plot(summary: dict[str, Any], stem: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in summary["rows"]:
        groups[f"{r['geometry']} ({r['layers']} layers)"].append(r)
    for label, rs in groups.items():
        mps = [r["mp"] for r in rs]
        ax[0].plot(mps, [r["decode_tok_s"] for r in rs], "o-", label=label)
        ax[1].plot(mps, [r["decode_step_ms"] for r in rs], "o-", label=label)
    ax[0].set(xlabel="model-parallel ways", ylabel="decode tok/s (batch 32, mixed adapters)")
    ax[1].set(xlabel="model-parallel ways", ylabel="decode step (ms)")
    for a in ax:
        a.set_xticks(sorted({r["mp"] for r in summary["rows"]}))
        a.legend()
    fig.suptitle(summary["rows"][0]["device"])
    fig.tight_layout()
    path = stem + ".png"
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    summary = summarize(sys.argv[1:])
    for r in summary["rows"]:
        print(
            f"{r['geometry']:11s} L{r['layers']} mp{r['mp']}: {r['decode_step_ms']:.2f} ms/step, {r['decode_tok_s']:.0f} tok/s, "
            f"x{r['speedup_over_mp1'] or float('nan'):.2f} over mp1, collectives {100 * r['collective_share_named']:.1f}% named, "
            f"<= {100 * r['collective_share_upper']:.1f}% with side streams"
        )
        if not batch_filled(r["mean_decode_rows"], r["batch"]):
            print(
                f"  WARNING: requests per decode step {r['mean_decode_rows']} (batch {r['batch']}): not a full batch"
            )
    path = write_result("decode-multigpu-summary", summary)
    print("wrote", path, plot(summary, os.path.splitext(path)[0]))


__all__ = ["RESULTS", "summarize"]

if __name__ == "__main__":
    main()
