"""mixed-step: what a step costs when prefill chunks join decode rows. Llama-2-7B geometry (random bf16
weights), `--decodes` requests decoding with their own rank-16 q/k/v/o adapters (or `--adapters`
shared ones of `--ranks`) while long prompts
are prefilled in chunks of `--chunk` tokens, so that every step during a prompt carries both. Times
decode-only steps, then the steps with a chunk (one mixed call, or a decode call and a prefill call
with --mixed-steps off), against their roofline floor (weights + KV + adapters over bandwidth measured
in the same run), and profiles the chunk steps' kernels.

python -m bench.mixed_step [--mixed-steps on|off] [--decodes 16] [--chunk 256] [--prompts 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def interleave_summary(steps: list[dict]) -> dict[str, dict[str, float]]:
    """The interleaved rounds' step periods by position: the chunk step, the first and second decode step
    after it, and the decode steps further on (steady)."""
    positions: dict[str, list[float]] = {
        "chunk": [],
        "decode_after_1": [],
        "decode_after_2": [],
        "decode_later": [],
    }
    since = None  # decode steps since the last chunk step
    for s in steps:
        if s["kind"] == "chunk":
            positions["chunk"].append(s["s"])
            since = 0
            continue
        if since is None:
            continue
        since += 1
        key = {1: "decode_after_1", 2: "decode_after_2"}.get(since, "decode_later")
        positions[key].append(s["s"])
    return {
        k: {"steps": len(v), "median_ms": float(np.median(v)) * 1e3, "mean_ms": float(np.mean(v)) * 1e3}
        for k, v in positions.items()
        if v
    }


def main() -> None:
    from bench.common import (
        add_attention_tunables_argument,
        add_lora_fields_argument,
        add_step_form_arguments,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check)")
    ap.add_argument("--mixed-steps", default="on")
    add_step_form_arguments(ap)
    ap.add_argument("--decodes", type=int, default=16)
    ap.add_argument(
        "--adapters",
        type=int,
        default=None,
        help="distinct adapters the decoding requests use (request i: adapter i %% adapters); default one each",
    )
    ap.add_argument(
        "--ranks",
        default=str(RANK),
        help="adapter ranks, cycled over the adapters (the long prompts' adapter: the largest), e.g. 16,32,64 "
        "as slora-trace's n = 5; rank buckets (16, 64) when several",
    )
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=2048, help="each long prompt: prompt / chunk chunk steps")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument(
        "--decode-prompt",
        type=int,
        default=64,
        help="each decoding request's prompt (its context grows from it)",
    )
    ap.add_argument(
        "--decode-lengths",
        default="uniform",
        choices=("uniform", "trace"),
        help="uniform: every decoding request's prompt is --decode-prompt tokens; trace: each is the "
        "context of an S-LoRA trace request at a random point of its decode (8 to ~1,000 tokens)",
    )
    add_attention_tunables_argument(ap)
    add_lora_fields_argument(ap)
    ap.add_argument(
        "--profile-decode", action="store_true", help="also trace 10 decode-only steps: their kernels by name"
    )
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="also time N rounds, unprofiled, of one --chunk-token prompt (one chunk step) among decode "
        "steps, as slora-trace runs them: the chunk step's period and the decode step's after it, against "
        "the steady decode step's",
    )
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import dataclasses

    import jax

    import jlora
    from bench.common import (
        attention_tunables_record,
        lora_tiers_record,
        override_attention_tunables,
        override_lora_fields,
        prefill_tunables_record,
        step_weight_bytes,
        write_result,
    )
    from bench.decode_7b import load_random_adapters, make_params
    from bench.kernels.attention import trace_lengths
    from bench.kernels.timing import bandwidth, roofline_TBps
    from bench.profile import host_breakdown, kernel_breakdown
    from jlora.config import PRESETS, EngineConfig
    from jlora.loader import LoadedModel
    from jlora.scheduler import SchedulerConfig

    config = PRESETS[args.geometry]
    ranks = tuple(int(r) for r in args.ranks.split(","))
    n_adapters = min(args.adapters or args.decodes, args.decodes)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    override_attention_tunables(args)  # before the engine traces its steps
    override_lora_fields(args.lora_fields)
    if args.decode_lengths == "trace":
        decode_prompts = [int(n) for n in trace_lengths(args.decodes, args.decodes)]
    else:
        decode_prompts = [args.decode_prompt] * args.decodes
    max_len = max(args.prompt, *decode_prompts) + 512
    pages_per_seq = -(-max_len // 16)
    ec = EngineConfig(
        page_size=16,
        num_pages=(args.decodes + 2) * (pages_per_seq + 8) + 64,
        max_model_len=max_len,
        max_batch=args.decodes + 1,
        decode_batch_buckets=(args.decodes + 1,),
        prefill_batch_buckets=(1,),
        prefill_chunk_buckets=(args.chunk,),
        page_buckets=(pages_per_seq,),
        lora_rank_buckets=(RANK,) if ranks == (RANK,) else (16, 64),
        lora_modules=TARGETS,
        compilation_cache_dir=None,
        implementation=args.impl,
        layer_loop="unrolled",
        greedy_only=True,
        mixed_steps=args.mixed_steps,
        rows_in_place=args.rows_in_place,
        materialize_norms=args.materialize_norms == "on",
        command_buffer_scheduling=args.command_buffer_scheduling,
    )
    sched = SchedulerConfig(
        max_batch=args.decodes + 1,
        max_prefill_tokens=args.chunk,
        max_prefill_seqs=1,
        max_chunk=args.chunk,
        max_model_len=max_len,
    )
    params = make_params(config, None, unrolled=True)
    weight_bytes = step_weight_bytes(params, config.tie_word_embeddings)
    bw = bandwidth()
    bps = roofline_TBps(bw) * 1e12
    start = time.perf_counter()
    engine = jlora.Engine(LoadedModel(config, params, None, {}, "random"), ec, scheduler_config=sched)
    startup = time.perf_counter() - start
    del params
    # the decoding requests' adapters a0 .. a{n_adapters - 1}, then the long prompts' (the largest rank)
    adapter_ranks = [ranks[i % len(ranks)] for i in range(n_adapters)] + [max(ranks)]
    names = load_random_adapters(engine, config, n_adapters + 1, tuple(adapter_ranks))
    paged, runner = engine.paged, engine.runner
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    adapters_bytes = sum(
        paged.memory.adapter_pages_needed({m: r for m in TARGETS}) * paged.layout.page_bytes(2)
        for r in adapter_ranks
    )

    steps: list[dict] = []  # one per step: kind, seconds (step period), context tokens, adapters
    original = paged.collect
    last = {"end": None}

    def timed_collect(inflight):
        begin = time.perf_counter()
        out = original(inflight)
        end = time.perf_counter()
        last["wait"] = end - begin  # the host waiting for the device's result
        kinds = sorted({c.kind for c in inflight.calls})
        chunk = any(k != "decode" for k in kinds)
        if last["end"] is not None:
            context = sum(len(st.prompt) + len(st.generated) for st in runner.states.values())
            steps.append(
                {
                    "kind": "chunk" if chunk else "decode",
                    "phase": last.get("phase", "main"),
                    "calls": kinds,
                    "s": end - last["end"],
                    "kv": context,
                    "host_s": None,  # filled in by the step() that collected it
                }
            )
        last["end"] = end
        return out

    paged.collect = timed_collect
    step = runner.step

    def timed_step():
        """runner.step, recording the host's own time in it (not waiting for the device) on the step
        it collected: a step period above the device's busy time with host time near the period is
        host-bound."""
        last["wait"] = 0.0
        n = len(steps)
        begin = time.perf_counter()
        out = step()
        if len(steps) > n:
            steps[-1]["host_s"] = time.perf_counter() - begin - last["wait"]
        return out

    runner.step = timed_step
    rng = np.random.default_rng(0)
    sp_long = jlora.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    sp_one = jlora.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ids = [
        runner.add(
            engine._prepare(
                rng.integers(0, config.vocab_size, decode_prompts[i]).tolist(), sp_long, names[i % n_adapters]
            ),
            names[i % n_adapters],
        )
        for i in range(args.decodes)
    ]
    while any(not st.generated for st in runner.states.values()):  # the decodes' prefill
        runner.step()
    for _ in range(10):
        runner.step()
    steps.clear()
    last["end"] = None
    decode_trace = tempfile.mkdtemp() if args.profile_decode else None
    for i in range(40):
        if decode_trace and i == 25:
            jax.profiler.start_trace(decode_trace)
        runner.step()
        if decode_trace and i == 34:
            jax.block_until_ready(paged.pool)
            jax.profiler.stop_trace()
    if args.interleave:
        last["phase"] = "interleave"
        for _ in range(args.interleave):  # a one-chunk prompt, then decode-only steps until the next
            state = engine._prepare(
                rng.integers(0, config.vocab_size, args.chunk).tolist(), sp_one, names[-1]
            )
            rid = runner.add(state, names[-1])
            while rid in runner.states:
                runner.step()
            for _ in range(6):
                runner.step()
        last["phase"] = "main"
    trace = tempfile.mkdtemp()
    traced_steps = 0
    for p in range(args.prompts):  # long prompts one at a time: prompt / chunk steps with a chunk each
        state = engine._prepare(rng.integers(0, config.vocab_size, args.prompt).tolist(), sp_one, names[-1])
        rid = runner.add(state, names[-1])
        if p == args.prompts - 1:
            jax.profiler.start_trace(trace)
        while rid in runner.states:
            runner.step()
            traced_steps += p == args.prompts - 1
        if p == args.prompts - 1:
            jax.block_until_ready(paged.pool)
            jax.profiler.stop_trace()
    for rid in ids:
        runner.cancel(rid)

    summary = {}
    if args.interleave:
        summary["interleave"] = interleave_summary([s for s in steps if s["phase"] == "interleave"])
    steps[:] = [s for s in steps if s["phase"] == "main"]
    for kind in ("decode", "chunk"):
        chosen = [s for s in steps if s["kind"] == kind][2:]  # not the first after a change
        if chosen:
            med = float(np.median([s["s"] for s in chosen]))
            # every request's KV (the long prompt's whole, an upper bound while it is prefilled) and
            # every distinct adapter, read once
            kv = float(np.mean([s["kv"] for s in chosen]))
            floor = (weight_bytes + adapters_bytes + kv * kv_bytes_per_token) / bps
            summary[kind] = {
                "steps": len(chosen),
                "median_ms": med * 1e3,
                "floor_ms": floor * 1e3,
                "roofline_fraction": floor / med,
                "host_ms_median": float(
                    np.median([s["host_s"] for s in chosen if s["host_s"] is not None] or [0])
                )
                * 1e3,
                "calls": sorted({c for s in chosen for c in s["calls"]}),
            }
    flops = 2 * (weight_bytes / 2) * (args.decodes + args.chunk)
    if "chunk" in summary:  # too few chunk steps (a short --prompt) leave none to time
        summary["chunk_step_tflops_at_median"] = flops / (summary["chunk"]["median_ms"] / 1e3) / 1e12
    if decode_trace:
        try:
            summary["decode_profile"] = kernel_breakdown(decode_trace, steps=10, top=25)
        except Exception as e:  # noqa: BLE001
            summary["decode_profile"] = {"error": repr(e)}
    try:
        summary["profile"] = kernel_breakdown(trace, steps=max(traced_steps, 1), top=20)
        summary["host_profile"] = host_breakdown(trace, steps=max(traced_steps, 1), top=20)
    except Exception as e:  # noqa: BLE001
        summary["profile"] = {"error": repr(e)}
    for kind in ("decode", "chunk"):
        s = summary.get(kind)
        if s:
            print(
                f"{kind:6s} {s['steps']:4d} steps, {s['median_ms']:.2f} ms (floor {s['floor_ms']:.2f}, "
                f"{s['roofline_fraction']:.2f}) host {s['host_ms_median']:.2f} ms calls {s['calls']}"
            )
    for position, row in summary.get("interleave", {}).items():
        print(f"interleaved {position:14s} {row['steps']:4d} steps, median {row['median_ms']:.3f} ms")
    prof = summary.get("decode_profile", {})
    if "top" in prof:
        print(f"decode steps: device busy {prof['device_busy_ms_per_step']:.2f} ms/step")
        for row in prof["top"][:25]:
            print(f"  {row['ms_per_step']:7.3f} ms {row['calls_per_step']:6.1f}x  {row['kernel'][:90]}")
    prof = summary["profile"]
    if "top" in prof:
        print(f"chunk steps: device busy {prof['device_busy_ms_per_step']:.2f} ms/step")
        for row in prof["top"][:14]:
            print(f"  {row['ms_per_step']:7.3f} ms {row['calls_per_step']:6.1f}x  {row['kernel'][:90]}")
    out = write_result(
        f"mixed-step{args.tag}",
        {
            "workload": {
                "geometry": args.geometry,
                "layers": config.num_hidden_layers,
                "decodes": args.decodes,
                "chunk": args.chunk,
                "prompt": args.prompt,
                "prompts": args.prompts,
                "decode_prompt": args.decode_prompt,
                "decode_lengths": args.decode_lengths,
                "decode_prompts": decode_prompts,
                "attention_tunables": args.attention_tunables,
                "attention_tunables_used": attention_tunables_record(),
                "prefill_tunables_used": prefill_tunables_record(),
                "lora_fields": args.lora_fields,
                "lora_tiers_used": lora_tiers_record(),
                "mixed_steps": args.mixed_steps,
                "rows_in_place": args.rows_in_place,
                "materialize_norms": args.materialize_norms,
                "command_buffer_scheduling": args.command_buffer_scheduling,
                "adapter_ranks": adapter_ranks,
            },
            "bandwidth": bw,
            "weight_bytes": weight_bytes,
            "startup_s": startup,
            **summary,
        },
    )
    print("wrote", out)
    os._exit(0)


if __name__ == "__main__":
    main()
