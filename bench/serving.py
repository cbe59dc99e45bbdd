"""Serving harness: replay a trace against the engine in real time (open loop) and measure what users
of S-LoRA and vLLM measure. Requests are submitted at their arrival times between engine steps, so
queueing counts toward their latency.

Metrics: request and token throughput; time to first token, time per output token, end-to-end
latency (mean, p50, p99); first-token SLO attainment (within 6 s, as S-LoRA); adapter loads and
evictions; pool occupancy; and the roofline of the batches actually run (weights + KV read + the
distinct adapters of each step, over bandwidth) against the time those steps took.
"""

from __future__ import annotations

import collections
import shutil
import time
from typing import Any

import numpy as np

import jlora
from bench.common import embedding_row_bytes
from bench.trace import TraceRequest


class StepRecorder:
    """Wraps the paged engine's prepare/launch/collect: per-step wall time and the bytes a step must move.

    A step's wall time runs from its launch, or from the previous step's end if that came later (with
    host overlap the next step is queued while one runs), to the end of its collect: back-to-back
    steps are charged their period, and idle time between steps is not charged."""

    def __init__(self, engine: jlora.Engine, weight_bytes: int):
        self.paged = engine.paged
        c = engine.config
        itemsize = np.dtype(self.paged.dtype).itemsize
        self.kv_bytes_per_token = 2 * c.num_hidden_layers * c.kv_dim * itemsize
        self.page_bytes = self.paged.layout.page_bytes(itemsize) * self.paged.shards
        self.weight_bytes = weight_bytes
        self.embed_row_bytes = embedding_row_bytes(c, itemsize)
        self.steps: list[dict[str, float]] = []
        self._originals = (self.paged.prepare, self.paged.launch, self.paged.collect)
        self._info: dict[int, dict[str, float]] = {}
        self._last_end = 0.0
        self.paged.prepare, self.paged.launch, self.paged.collect = self._prepare, self._launch, self._collect

    def _prepare(self, schedule, sampling, sources=None):
        calls = self._originals[0](schedule, sampling, sources)
        chunks = schedule.decodes + schedule.prefills
        memory = self.paged.memory
        adapters = {ch.adapter for ch in chunks if ch.adapter}
        self._info[id(calls)] = {
            "bytes": floor_bytes(
                chunks,
                memory,
                len(calls) * self.weight_bytes,
                self.kv_bytes_per_token,
                self.page_bytes,
                self.embed_row_bytes,
            ),
            "tokens": sum(len(ch.tokens) for ch in chunks),
            "decodes": len(schedule.decodes),
            "prompts": len(schedule.prefills),  # sequences whose prompt chunks the step carries
            "kind": "mixed"
            if schedule.decodes and schedule.prefills
            else ("decode" if schedule.decodes else "prefill"),
            "adapters": len(adapters),
            "occupancy": 1 - memory.num_free / (memory.layout.num_pages - 1),
        }
        return calls

    def _launch(self, calls):
        info = self._info.pop(id(calls))
        info["launched"] = time.perf_counter()
        inflight = self._originals[1](calls)
        # the launch call's host time (XLA updates the step's command buffer in it)
        info["launch"] = time.perf_counter() - info["launched"]
        self._info[id(inflight)] = info
        return inflight

    def _collect(self, inflight):
        asked = time.perf_counter()
        out = self._originals[2](inflight)
        end = time.perf_counter()
        info = self._info.pop(id(inflight))
        info["wall"] = end - max(info.pop("launched"), self._last_end)
        # how long the host waited for the step: near 0, the device had finished before the host asked
        # (the host was the slower side, and the step's wall includes host time)
        info["blocked"] = end - asked
        info["end_unix"] = time.time()  # the wall clock, to line steps up with samples of the GPU's clocks
        self._last_end = end
        self.steps.append(info)
        return out

    def close(self) -> None:
        self.paged.prepare, self.paged.launch, self.paged.collect = self._originals


def floor_bytes(
    chunks, memory, weight_bytes: int, kv_bytes_per_token: int, page_bytes: int, embed_row_bytes: int = 0
) -> int:
    """A step's roofline bytes: its weights (read once per call: pass calls x step_weight_bytes, which
    leaves out an untied embedding table), the embedding rows of its tokens, the K/V of every chunk's
    sequence up to the chunk's end, and each distinct adapter's pages once."""
    adapters = {ch.adapter for ch in chunks if ch.adapter}
    pages = sum(memory.adapter_pages_needed(memory.adapters[a].placement.ranks) for a in adapters)
    kv = sum(ch.start + len(ch.tokens) for ch in chunks)
    tokens = sum(len(ch.tokens) for ch in chunks)
    return weight_bytes + tokens * embed_row_bytes + kv * kv_bytes_per_token + pages * page_bytes


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def replay(
    engine: jlora.Engine,
    trace: list[TraceRequest],
    adapter_names: list[str],
    *,
    vocab: int,
    bandwidth_Bps: float,
    weight_bytes: int,
    slo_s: float = 6.0,
    seed: int = 0,
    profile_window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Run the trace in real time; the metrics of the run. profile_window (start, end) in seconds of
    the replay: a jax.profiler trace of the steps between, their device time by kernel (the profiler
    costs host time, so a profiled replay's own figures are not the unprofiled run's)."""
    runner = engine.runner
    rng = np.random.default_rng(seed)
    recorder = StepRecorder(engine, weight_bytes)
    stats0 = dict(runner.scheduler.stats)
    phases0, steps0 = dict(runner.phase_seconds), runner.steps
    profiler = _WindowProfiler(profile_window, recorder) if profile_window else None
    pending = collections.deque(sorted(trace, key=lambda r: r.arrival))
    meta: dict[int, dict[str, Any]] = {}
    start = time.monotonic()
    try:
        while pending or runner.has_work():
            now = time.monotonic() - start
            while pending and pending[0].arrival <= now:
                r = pending.popleft()
                name = adapter_names[r.adapter]
                prompt = rng.integers(0, vocab, r.prompt_len).tolist()
                params = jlora.SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
                resident = engine.paged.memory.is_resident(name)
                rid = runner.add(engine._prepare(prompt, params, name), name)
                meta[rid] = {
                    "arrival": r.arrival,
                    "first": None,
                    "last": None,
                    "tokens": 0,
                    "cold": not resident,
                }
            if not runner.has_work():
                time.sleep(max(0.0, min(pending[0].arrival - now, 0.05)))
                continue
            if profiler is not None:
                profiler.at(now)
            events = runner.step()
            t = time.monotonic() - start
            for e in events:
                m = meta[e.request_id]
                if e.token is not None:
                    m["tokens"] += 1
                    m["first"] = t if m["first"] is None else m["first"]
                    m["last"] = t
                if e.finish_reason is not None:
                    m["end"] = t
                    m["finish"] = e.finish_reason
    finally:
        recorder.close()
        if profiler is not None:
            profiler.at(float("inf"))
    wall = time.monotonic() - start
    host_steps = max(runner.steps - steps0, 1)
    done = [m for m in meta.values() if m.get("finish") == "length"]
    ttft = [m["first"] - m["arrival"] for m in done]
    tpot = [(m["last"] - m["first"]) / (m["tokens"] - 1) for m in done if m["tokens"] > 1]
    e2e = [m["end"] - m["arrival"] for m in done]
    steps = recorder.steps
    step_wall = sum(s["wall"] for s in steps)
    floor_s = sum(s["bytes"] for s in steps) / bandwidth_Bps
    stats = {k: v - stats0.get(k, 0) for k, v in runner.scheduler.stats.items()}
    return {
        "requests": len(trace),
        "completed": len(done),
        "wall_s": wall,
        "throughput_req_s": len(done) / wall,
        "throughput_tok_s": sum(m["tokens"] for m in done) / wall,
        "ttft_s": _pct(ttft),
        "tpot_s": _pct(tpot),
        "e2e_s": _pct(e2e),
        "slo_attainment": float(np.mean([t <= slo_s for t in ttft])) if ttft else 0.0,
        "slo_s": slo_s,
        "ttft_cold_s": _pct([m["first"] - m["arrival"] for m in done if m["cold"]]),
        "ttft_warm_s": _pct([m["first"] - m["arrival"] for m in done if not m["cold"]]),
        "adapter_loads": stats.get("adapter_loads", 0),
        "adapter_evictions": stats.get("adapter_evictions", 0),
        "preemptions": stats.get("preemptions", 0),
        "steps": len(steps),
        "step_wall_s": step_wall,
        "roofline_s": floor_s,
        "roofline_fraction": floor_s / step_wall if step_wall else 0.0,
        "mean_batch_decodes": float(np.mean([s["decodes"] for s in steps])) if steps else 0.0,
        "mean_adapters_per_step": float(np.mean([s["adapters"] for s in steps])) if steps else 0.0,
        "pool_occupancy": _pct([s["occupancy"] for s in steps]),
        "by_kind": by_kind(steps, bandwidth_Bps),
        # the runner's host time a step by phase (wait: for the previous step's results)
        "host_ms_per_step": {
            k: (v - phases0.get(k, 0.0)) / host_steps * 1e3 for k, v in runner.phase_seconds.items()
        },
        **({"profile": profiler.summary(bandwidth_Bps)} if profiler is not None else {}),
        "per_step": per_step(steps, bandwidth_Bps),
    }


def per_step(steps: list[dict], bandwidth_Bps: float) -> dict[str, list]:
    """Every step in order, as columns: kind (d decode, m mixed, p prefill), tokens, distinct adapters,
    wall and floor ms, how long the host waited for it and how long its launch call took (ms), and when
    it ended (Unix seconds: bench.clocks lines the steps up with nvidia-smi's samples)."""
    return {
        "kind": "".join(s["kind"][0] for s in steps),
        "tokens": [s["tokens"] for s in steps],
        "adapters": [s["adapters"] for s in steps],
        "wall_ms": [round(s["wall"] * 1e3, 3) for s in steps],
        "floor_ms": [round(s["bytes"] / bandwidth_Bps * 1e3, 3) for s in steps],
        "blocked_ms": [round(s.get("blocked", float("nan")) * 1e3, 3) for s in steps],
        "launch_ms": [round(s.get("launch", float("nan")) * 1e3, 3) for s in steps],
        "end_s": [round(s.get("end_unix", float("nan")), 4) for s in steps],
    }


class _WindowProfiler:
    """A jax.profiler trace over [start, end) seconds of a replay, and its steps' kernels."""

    def __init__(self, window: tuple[float, float], recorder: StepRecorder):
        import tempfile

        self.start, self.end = window
        self.recorder = recorder
        self.folder = tempfile.mkdtemp(prefix="slora-profile-")
        self.first = self.last = None  # recorder.steps indices of the profiled steps

    def at(self, now: float) -> None:
        import jax

        if self.first is None and self.start <= now < self.end:
            jax.profiler.start_trace(self.folder)
            self.first = len(self.recorder.steps)
        elif self.first is not None and self.last is None and now >= self.end:
            jax.profiler.stop_trace()
            self.last = len(self.recorder.steps)

    def summary(self, bandwidth_Bps: float) -> dict[str, Any]:
        from bench.profile import kernel_breakdown

        if self.first is None or self.last is None:
            return {"error": "the replay ended before the window"}
        # the steps collected in the window, give or take the one in flight at either end
        mine = self.recorder.steps[self.first : self.last]
        out = {"window_s": [self.start, self.end], "by_kind": by_kind(mine, bandwidth_Bps)}
        try:
            out["kernels"] = kernel_breakdown(self.folder, steps=max(len(mine), 1), top=30)
        except Exception as e:  # a profile that cannot be read must not lose the run
            out["kernels"] = {"error": repr(e)}
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)  # a trace is hundreds of MB on a GPU
        return out


def _summary(mine: list[dict], bandwidth_Bps: float) -> dict[str, float]:
    wall = sum(s["wall"] for s in mine)
    floor = sum(s["bytes"] for s in mine) / bandwidth_Bps
    walls = np.asarray([s["wall"] for s in mine]) * 1e3
    blocked = np.asarray([s.get("blocked", np.nan) for s in mine]) * 1e3
    return {
        "steps": len(mine),
        "wall_s": wall,
        "mean_step_ms": wall / len(mine) * 1e3,
        "median_step_ms": float(np.median(walls)),
        "p90_step_ms": float(np.percentile(walls, 90)),
        "median_floor_ms": float(np.median([s["bytes"] for s in mine])) / bandwidth_Bps * 1e3,
        # steps whose collect found the device done (< 0.1 ms wait): the host set their pace
        "host_paced_steps": int(np.sum(blocked < 0.1)),
        "median_blocked_ms": float(np.median(blocked)),
        "roofline_s": floor,
        "roofline_fraction": floor / wall if wall else 0.0,
        "mean_tokens": float(np.mean([s["tokens"] for s in mine])),
    }


def by_kind(steps: list[dict], bandwidth_Bps: float) -> dict[str, dict]:
    """Steps, their wall time and their roofline share, for decode-only, prefill-only and mixed steps;
    the steps that carry prompt chunks also by how many prompts they carry ("by_prompts": a step of P
    prompts computes P padded chunks)."""
    out = {}
    for kind in ("decode", "prefill", "mixed"):
        mine = [s for s in steps if s["kind"] == kind]
        if not mine:
            continue
        out[kind] = _summary(mine, bandwidth_Bps)
        if kind != "decode" and all("prompts" in s for s in mine):
            counts = sorted({s["prompts"] for s in mine})
            out[kind]["by_prompts"] = {
                str(p): _summary([s for s in mine if s["prompts"] == p], bandwidth_Bps) for p in counts
            }
    return out


def cold_vs_warm(
    engine: jlora.Engine,
    names: list[str],
    *,
    vocab: int,
    prompt_len: int = 32,
    ranks: list[int] | None = None,
) -> dict[str, Any]:
    """T7: first-token time of a lone request whose adapter is not on the device (cold), then again
    with it resident (warm), against the decode step time of the same engine. Each adapter's times
    are kept with its rank (`ranks`, one per name, where given): the copy grows with it; and with the
    host's time in each runner phase (ms) and the steps it launched up to the first token."""
    rng = np.random.default_rng(1)
    prompt_len = min(prompt_len, engine.paged.config.max_model_len - 4)  # room for the 4 new tokens
    out: dict[str, list[float]] = {"cold": [], "warm": [], "decode_step": []}
    phases: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for name in names:
        for label in ("cold", "warm"):
            if label == "cold":
                assert not engine.paged.memory.is_resident(name), name
            prompt = rng.integers(0, vocab, prompt_len).tolist()
            params = jlora.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            runner = engine.runner
            phases0, steps0 = dict(runner.phase_seconds), runner.steps
            start = time.perf_counter()
            stamps = []
            for _ in engine.stream(prompt, params, adapter=name):
                stamps.append(time.perf_counter())
                if len(stamps) == 1:  # the host's phases and steps up to the first token
                    phases[label].append(
                        {k: (v - phases0.get(k, 0.0)) * 1e3 for k, v in runner.phase_seconds.items()}
                        | {"steps": runner.steps - steps0}
                    )
            out[label].append(stamps[0] - start)
            out["decode_step"].append(float(np.median(np.diff(stamps))))
    cold, warm, step = (float(np.median(out[k])) for k in ("cold", "warm", "decode_step"))
    return {
        "ttft_cold_s": cold,
        "ttft_warm_s": warm,
        "decode_step_s": step,
        "extra_s": cold - warm,
        "extra_in_decode_steps": (cold - warm) / step,
        "T7_met": cold - warm <= step,
        "samples": len(names),
        "per_adapter_ms": [
            {
                "cold": c * 1e3,
                "warm": w * 1e3,
                **({"rank": ranks[i]} if ranks else {}),
                "host_to_first_token": {"cold": phases["cold"][i], "warm": phases["warm"][i]},
            }
            for i, (c, w) in enumerate(zip(out["cold"], out["warm"]))
        ],
    }
