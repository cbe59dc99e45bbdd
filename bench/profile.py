"""Where device time goes: kernel time by name from a jax.profiler trace (no TensorBoard needed)."""

from __future__ import annotations

import collections
import glob
import os
import re


def _newest_trace(trace_dir: str):
    """The newest trace under trace_dir as a jax.profiler.ProfileData, or None when there is none."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    return ProfileData.from_file(max(files, key=os.path.getmtime)) if files else None


def _fold(name: str) -> str:
    """An event name with its numbered-copy suffixes (fusion.3, nvjet_..._2) removed."""
    return re.sub(r"(\.\d+|_\d+)+$", "", name)


def gpu_lines(trace_dir: str):
    """The newest trace under trace_dir, its first GPU's lines: (ms and calls by event name, numbered
    copies of one fusion folded together; each line's event spans; how many GPUs the trace holds).
    A str saying what is missing instead when there is no trace or no GPU plane."""
    data = _newest_trace(trace_dir)
    if data is None:
        return f"no trace under {trace_dir}"
    lines: dict[str, dict[str, list[float]]] = {}
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    gpus = [p for p in data.planes if p.name.startswith("/device:GPU") and _has_events(p)]
    for plane in gpus[:1]:  # one device: with tensor parallelism every device runs the same program
        for line in plane.lines:
            by_name = lines.setdefault(line.name, collections.defaultdict(lambda: [0.0, 0]))
            for e in line.events:
                name = _fold(e.name)
                by_name[name][0] += e.duration_ns / 1e6
                by_name[name][1] += 1
                spans[line.name].append((e.start_ns, e.start_ns + e.duration_ns))
    if not lines:
        return "no GPU plane in the trace"
    return lines, spans, len(gpus)


def busiest_stream(lines: dict[str, dict[str, list[float]]]) -> str:
    """The line that holds the kernels: the one with the most events, not counting "XLA Ops" (HLO op
    names) and "XLA Modules" (one event per call)."""
    streams = [n for n in lines if n not in ("XLA Ops", "XLA Modules")]
    return max(streams, key=lambda n: sum(c for _, c in lines[n].values()))


def kernel_breakdown(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Per-step device time by kernel name (numbered copies of one fusion folded together)."""
    read = gpu_lines(trace_dir)
    if isinstance(read, str):
        return {"error": read}
    lines, spans, n_gpus = read
    kernel_line = busiest_stream(lines)
    out = {
        "steps": steps,
        "lines": {n: sum(v[0] for v in d.values()) / steps for n, d in lines.items()},
        "kernel_line": kernel_line,
    }
    for label, name in (("top", kernel_line), ("top_xla_ops", "XLA Ops")):
        by_name = lines.get(name, {})
        rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
        out[label] = [
            {"kernel": k, "ms_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for k, v in rows[:top]
        ]
    by_name = lines[kernel_line]
    out["device_busy_ms_per_step"] = sum(v[0] for v in by_name.values()) / steps
    collective = re.compile(r"nccl|all.?reduce|all.?gather|reduce.?scatter", re.IGNORECASE)
    # NCCL kernels run on their own streams: count them on every line of the device
    out["collective_ms_per_step"] = (
        sum(v[0] for d in lines.values() for k, v in d.items() if collective.search(k)) / steps
    )
    out["collective_kernels"] = sorted({k for d in lines.values() for k in d if collective.search(k)})[:10]
    out["devices_traced"] = n_gpus
    out["kernels_per_step"] = sum(v[1] for v in by_name.values()) / steps
    # idle time between kernels: short gaps are launch overhead, long ones the host between steps
    events = sorted(spans[kernel_line])
    short = long = 0.0
    for (_, end), (start, _) in zip(events, events[1:]):
        gap = max(0.0, start - end) / 1e6
        if gap < 0.1:
            short += gap
        else:
            long += gap
    out["idle_ms_per_step_in_step_gaps"] = short / steps
    out["idle_ms_per_step_between_steps"] = long / steps
    return out


def host_breakdown(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Host time per step by event name over every host thread (Python calls, PJRT execute and launch,
    allocator and stream waits): where a step's launch spends its time on the host."""
    data = _newest_trace(trace_dir)
    if data is None:
        return {"error": f"no trace under {trace_dir}"}
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for e in line.events:
                key = f"{line.name[:24]} | {_fold(e.name)[:80]}"
                by_name[key][0] += e.duration_ns / 1e6
                by_name[key][1] += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "top": [{"event": k, "ms_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for k, v in rows],
    }


def _has_events(plane) -> bool:
    for line in plane.lines:
        for _ in line.events:  # events support iteration only
            return True
    return False
