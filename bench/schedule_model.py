"""The slora-trace's roofline fraction predicted on the host: the S-LoRA trace (trace.py) replayed through
the engine's own Scheduler and PoolManager, each step charged by a cost model fitted to GPU runs, and
its byte floor counted as bench.serving counts it (weights once a step, the K/V of every chunk's
sequence, each distinct adapter). What-if questions about scheduling (the prompt-token budget, chunk
buckets, prompts a step) and about step costs (a faster decode step, a smaller fixed cost of a chunk)
are answered in seconds before any GPU time is spent.

Cost model (H200): a decode-only step takes its floor / --decode-share; a step that carries prompt
chunks takes that plus --chunk-fixed-ms plus --row-us per computed row (decode rows + padded prompt
rows) past --ridge-rows, where the weight GEMMs turn compute-bound. Host time is not modelled (the
runner overlaps it). The defaults are refitted to slora-trace-llama2-7b-20261204T181332.json at n = 1,000
(rank 8: 0.904 predicted, 0.903 measured; chunk steps 8.85 against 8.90 ms); its n = 5 (ranks 16-64)
fits --decode-share 0.93 --chunk-fixed-ms 2.0 (0.872 predicted, 0.876 measured). With --pad-row-us 20 each
decode row a step pads to its bucket (--decode-buckets, --mixed-decode-buckets) is priced apart: n = 5
then fits --decode-share 0.95 (0.870), and decode buckets 8,16,24,32 predict 0.878.

python -m bench.schedule_model [--n 1000] [--chunk 256] [--chunk-buckets 64,128,192] [--prefill-seqs 1]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

from bench.common import embedding_row_bytes
from bench.serving import floor_bytes
from bench.trace import adapter_ranks, slora_trace
from jlora.config import PRESETS
from jlora.engine import pool_layout
from jlora.pool.memory import PoolManager
from jlora.scheduler import SchedRequest, Scheduler, SchedulerConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class StepCosts:
    copy_TBps: float = 3.32  # the floor's bandwidth (bench.kernels.timing's copy figure on the H200)
    decode_share: float = 0.955  # a decode-only step's floor / its time
    chunk_fixed_ms: float = 1.5  # what carrying prompt chunks adds to a step, whatever their length
    row_us: float = 19.0  # each computed row past the ridge (2 x 6.7 GFLOP at ~700 TFLOP/s)
    ridge_rows: int = 130
    # each decode row a step pads to its bucket (0: not modelled apart, inside decode_share); the
    # per-step records of slora-trace put it at ~20 us (a step's excess over its floor by row count)
    pad_row_us: float = 0.0


def replay(
    model: str,
    n: int,
    rate: float,
    duration: float,
    chunk: int,
    chunk_buckets: tuple[int, ...],
    prefill_seqs: int,
    costs: StepCosts,
    batch: int = 32,
    pages: int = 3000,
    ranks: tuple[int, ...] = (8, 16, 32, 64),
    mixed_up_to: int = 100,
    weight_bytes: int | None = None,
    decode_buckets: tuple[int, ...] = (16, 32),
    mixed_decode_buckets: tuple[int, ...] = (16, 32),
) -> dict:
    """Replay the trace; the modelled steps, their floors and times, and the roofline fraction."""
    config = PRESETS[model]
    layout = pool_layout(config, num_pages=pages, page_size=16, lora_modules=TARGETS)
    memory = PoolManager(layout)
    sched = Scheduler(
        SchedulerConfig(
            max_batch=batch,
            max_prefill_tokens=chunk,
            max_chunk=chunk,
            max_prefill_seqs=prefill_seqs,
            max_model_len=1024,
        ),
        memory,
    )
    if weight_bytes is None:  # bf16 weights a step reads: every projection, the norms and the LM head (a
        # tied embedding table is the head; an untied one is read only at the tokens' rows, which
        # floor_bytes counts)
        per_layer = sum(i * o for i, o in config.module_shapes().values()) + 2 * config.hidden_size
        weight_bytes = 2 * (
            config.num_hidden_layers * per_layer + config.vocab_size * config.hidden_size + config.hidden_size
        )
    row_bytes = embedding_row_bytes(config)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    page_bytes = layout.page_bytes(2)
    rank_of = adapter_ranks(n, ranks) if n <= mixed_up_to else [8] * n
    trace = slora_trace(n, 1.0, rate, 1.0, duration)
    buckets = sorted({*chunk_buckets, chunk})
    now, i = 0.0, 0
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    while i < len(trace) or sched.has_work():
        while i < len(trace) and trace[i].arrival <= now:
            r = trace[i]
            sched.add(
                SchedRequest(
                    i,
                    [1] * r.prompt_len,
                    r.output_len,
                    f"a{r.adapter}",
                    {m: rank_of[r.adapter] for m in TARGETS},
                    arrival=now,
                )
            )
            i += 1
        s = sched.schedule(now)
        if s.empty:
            now = trace[i].arrival if i < len(trace) else now + 1e-3
            continue
        chunks = s.decodes + s.prefills
        floor = floor_bytes(chunks, memory, weight_bytes, kv_per_token, page_bytes, row_bytes) / (
            costs.copy_TBps * 1e12
        )
        seconds = floor / costs.decode_share
        if s.decodes and costs.pad_row_us:
            rows_bucket = min(
                b for b in (mixed_decode_buckets if s.prefills else decode_buckets) if b >= len(s.decodes)
            )
            seconds += costs.pad_row_us * 1e-6 * (rows_bucket - len(s.decodes))
        kind = "decode"
        if s.prefills:
            kind = "mixed" if s.decodes else "prefill"
            width = min(b for b in buckets if b >= max(len(c.tokens) for c in s.prefills))
            seqs = 1 << (len(s.prefills) - 1).bit_length()  # prompts a step: buckets 1, 2, 4
            rows = len(s.decodes) + seqs * width
            seconds += (costs.chunk_fixed_ms + costs.row_us * 1e-3 * max(0, rows - costs.ridge_rows)) / 1e3
            kinds[kind]["rows"] += rows
        kinds[kind]["steps"] += 1
        kinds[kind]["floor_s"] += floor
        kinds[kind]["wall_s"] += seconds
        now += seconds
        for c in chunks:
            if c.sample:
                sched.on_token(c.request_id, 1, now)
                req = sched.requests[c.request_id]
                if req.num_generated >= req.max_tokens:
                    sched.finish(c.request_id)
    floor = sum(k["floor_s"] for k in kinds.values())
    wall = sum(k["wall_s"] for k in kinds.values())
    return {
        "roofline_fraction": floor / wall,
        "wall_s": wall,
        "by_kind": {
            kind: {
                "steps": k["steps"],
                "mean_step_ms": 1e3 * k["wall_s"] / k["steps"],
                "roofline_fraction": k["floor_s"] / k["wall_s"],
                **({"mean_rows": k["rows"] / k["steps"]} if "rows" in k else {}),
            }
            for kind, k in kinds.items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--chunk-buckets", default="64,128,192")
    ap.add_argument("--prefill-seqs", type=int, default=1, choices=(1, 2, 4))
    ap.add_argument(
        "--decode-buckets", default="16,32", help="decode-only steps' row buckets (with --pad-row-us)"
    )
    ap.add_argument("--mixed-decode-buckets", default="16,32", help="mixed steps' decode-row buckets")
    for field in dataclasses.fields(StepCosts):
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = ap.parse_args()
    costs = StepCosts(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StepCosts)})
    buckets = tuple(int(v) for v in args.chunk_buckets.split(",") if v)
    rows = {
        key: tuple(int(v) for v in getattr(args, key).split(",") if v)
        for key in ("decode_buckets", "mixed_decode_buckets")
    }
    result = replay(
        args.model, args.n, args.rate, args.duration, args.chunk, buckets, args.prefill_seqs, costs, **rows
    )
    print(json.dumps({"costs": dataclasses.asdict(costs), **result}, indent=1))


if __name__ == "__main__":
    main()
