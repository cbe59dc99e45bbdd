"""Where device time goes: kernel time by name from a jax.profiler trace (no TensorBoard needed)."""

from __future__ import annotations

import collections
import glob
import os
import re


def kernel_breakdown(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Per-step device time by kernel name (numbered copies of one fusion folded together)."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"error": f"no trace under {trace_dir}"}
    data = ProfileData.from_file(max(files, key=os.path.getmtime))
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    busy = 0.0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower() or "memcpy" in line.name.lower():
                continue
            for e in line.events:
                name = re.sub(r"(\.\d+|_\d+)+$", "", e.name)
                by_name[name][0] += e.duration_ns / 1e6
                by_name[name][1] += 1
                busy += e.duration_ns / 1e6
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {
        "steps": steps,
        "device_busy_ms_per_step": busy / steps,
        "kernels_per_step": sum(c for _, c in by_name.values()) / steps,
        "top": [{"kernel": k, "ms_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for k, v in rows[:top]],
    }
