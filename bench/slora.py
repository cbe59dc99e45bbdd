"""slora-trace (../shared/BENCH.md): the S-LoRA workload against jlora's paged engine, for each number
of adapters n, with first-token SLO attainment, latency percentiles and the roofline of the batches
run; plus T7 (cold vs warm first-token time). Random adapters are written as real PEFT folders and
loaded through Engine.load_adapter (a few distinct folders per rank, shared by many adapter names, so
2,000 adapters fit the disk; every name is its own adapter to the engine: its own host copy, pages).

GPU:  python -m bench.slora --model llama2-7b --n 5,100,1000,2000 --rate 6 --duration 40
CPU:  python -m bench.slora --model smollm2 --n 5,100 --rate 1 --duration 30 --input 8,64 --output 8,64
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DISTINCT = 4  # distinct folders per rank
LOAD_THREADS = min(8, os.cpu_count() or 1)


def row_buckets(spec: str, batch: int) -> tuple[int, ...]:
    """A comma list of row buckets as the engine takes them: those under batch, and batch."""
    return tuple(sorted({int(v) for v in spec.split(",") if v and int(v) < batch} | {batch}))


def build_engine(model: str, args):
    import jax
    import jax.numpy as jnp

    import jlora
    from bench.common import step_weight_bytes
    from jlora.config import PRESETS, EngineConfig
    from jlora.loader import LoadedModel
    from jlora.model.llama import random_params
    from jlora.scheduler import SchedulerConfig

    max_len = args.input[1] + args.output[1]
    if model == "smollm2":
        loaded = jlora.loader.load("smollm2-135m", "float32", progress=False)
    else:
        config = PRESETS[model]
        params = jax.jit(lambda k: random_params(config, k, jnp.bfloat16))(jax.random.PRNGKey(0))
        loaded = LoadedModel(config, params, None, {}, "random")
    pages = -(-max_len // 16)
    ec = EngineConfig(
        page_size=16,
        num_pages=args.pages,
        max_model_len=max_len,
        max_batch=args.batch,
        decode_batch_buckets=row_buckets(args.decode_buckets, args.batch),
        mixed_decode_batch_buckets=row_buckets(args.mixed_decode_buckets, args.batch),
        # a lone chunk computes its own rows, not four (mixed steps)
        prefill_batch_buckets=tuple(b for b in (1, 2, 4) if b <= args.prefill_seqs),
        prefill_chunk_buckets=args.chunk_buckets,
        page_buckets=(pages,) if args.one_page_bucket else (pages // 4, pages),
        lora_rank_buckets=(16, 64),
        lora_modules=tuple(TARGETS),
        compilation_cache_dir=None,
        implementation=args.impl,
        layer_loop=args.layer_loop,
        greedy_only=True,  # the trace decodes greedily: half the start-up compiles
        mixed_steps=args.mixed_steps,
        rows_in_place=args.rows_in_place,
        materialize_norms=args.materialize_norms == "on",
        command_buffer_scheduling=args.command_buffer_scheduling,
    )
    sched = SchedulerConfig(
        max_batch=args.batch,
        max_prefill_tokens=args.chunk,
        max_chunk=args.chunk,
        max_prefill_seqs=args.prefill_seqs,
        max_model_len=max_len,
    )
    start = time.perf_counter()
    engine = jlora.Engine(loaded, ec, scheduler_config=sched)
    weight_bytes = step_weight_bytes(loaded.params, loaded.config.tie_word_embeddings)
    if (
        ec.resolved_layer_loop() == "unrolled"
    ):  # the engine keeps its own per-layer copy: drop the stacked one
        engine.model = dataclasses.replace(engine.model, params=None)
    return engine, weight_bytes, time.perf_counter() - start


def make_payload(
    args, bw: dict, weight_bytes: int, startup: float, runs: list[dict], warm_up_s: float = 0.0
) -> dict:
    """The slora-trace result: workload, bandwidth, the runs, and T4 over the runs at the base rate."""
    from bench.common import attention_tunables_record, lora_tiers_record, prefill_tunables_record

    by_n = [r for r in runs if r["rate"] == args.rate]
    return {
        "workload": {
            "model": args.model,
            "rate": args.rate,
            "cv": args.cv,
            "alpha": args.alpha,
            "duration_s": args.duration,
            "input": args.input,
            "output": args.output,
            "targets": TARGETS,
            "max_batch": args.batch,
            "pages": args.pages,
            "impl": args.impl,
            "layer_loop": args.layer_loop,
            "mixed_steps": args.mixed_steps,
            "rows_in_place": args.rows_in_place,
            "materialize_norms": args.materialize_norms,
            "command_buffer_scheduling": args.command_buffer_scheduling,
            "chunk": args.chunk,
            "chunk_buckets": args.chunk_buckets,
            "decode_buckets": row_buckets(args.decode_buckets, args.batch),
            "mixed_decode_buckets": row_buckets(args.mixed_decode_buckets, args.batch),
            "prefill_seqs": args.prefill_seqs,
            "attention_tunables": args.attention_tunables,
            "attention_tunables_used": attention_tunables_record(),
            "prefill_tunables_used": prefill_tunables_record(),
            "lora_fields": args.lora_fields,
            "lora_tiers_used": lora_tiers_record(),
        },
        "bandwidth": bw,
        "weight_bytes": weight_bytes,
        # a step's floor: weight_bytes (no untied embedding table) + its tokens' embedding rows + K/V +
        # distinct adapters' pages (bench.serving.floor_bytes); results without this key counted the table
        "floor_weights": "step",
        "startup_s": startup,
        "warm_up_s": warm_up_s,
        "runs": runs,
        "T4": {
            "roofline_fraction_min": min(r["roofline_fraction"] for r in by_n),
            "slo_at_largest_n": by_n[-1]["slo_attainment"],
            "met": all(r["roofline_fraction"] >= 0.9 for r in by_n) and by_n[-1]["slo_attainment"] >= 0.95,
            **repeats_record(by_n),
        },
    }


def repeat_summary(result: dict) -> dict:
    """One replay's figures, for a run's repeats: roofline, SLO, throughput, wall of the steps and its decode
    steps more than 1 ms over their floor."""
    from bench.trace_steps import outlier_steps, step_columns

    return {
        "roofline_fraction": result["roofline_fraction"],
        "slo_attainment": result["slo_attainment"],
        "throughput_tok_s": result["throughput_tok_s"],
        "step_wall_s": result["step_wall_s"],
        "decode_outliers": int(outlier_steps(step_columns(result["per_step"])).sum()),
    }


def repeats_record(by_n: list[dict]) -> dict:
    """T4 over repeated replays (--repeats), where every run has them: each n's roofline fractions, and
    whether every n met 0.90 by the mean of its replays and in every replay. Empty without repeats."""
    if not by_n or not all("repeats" in r for r in by_n):
        return {}
    fractions = {str(r["n"]): [x["roofline_fraction"] for x in r["repeats"]] for r in by_n}
    return {
        "roofline_fraction_repeats": fractions,
        "met_by_mean_of_repeats": all(sum(v) / len(v) >= 0.9 for v in fractions.values()),
        "met_in_every_repeat": all(min(v) >= 0.9 for v in fractions.values()),
    }


def main() -> None:
    from bench.common import (
        add_attention_tunables_argument,
        add_lora_fields_argument,
        add_step_form_arguments,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="smollm2 | llama2-7b | llama3-8b")
    ap.add_argument("--n", default="5,100")
    ap.add_argument("--ranks", default="8,16,32,64", help="rank set for n <= --mixed-up-to")
    ap.add_argument("--mixed-up-to", type=int, default=100, help="larger n use rank 8 only (host memory)")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--input", default="8,512")
    ap.add_argument("--output", default="8,512")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256, help="prompt tokens per step, all sequences together")
    ap.add_argument(
        "--prefill-seqs", type=int, default=4, choices=(1, 2, 4), help="sequences whose prompts share a step"
    )
    ap.add_argument(
        "--decode-buckets",
        default="8,16,24,32",
        help="decode-only steps' row buckets (those under --batch, and --batch): a padded row costs ~20 us "
        "a step on the H200, and each bucket a compile per rank bucket",
    )
    ap.add_argument(
        "--mixed-decode-buckets",
        default="16,32",
        help="the decode rows' buckets in mixed steps (as --decode-buckets; each a compile per chunk bucket)",
    )
    ap.add_argument(
        "--chunk-buckets",
        default="",
        help="compiled chunk lengths up to --chunk, e.g. 64,128 (with --prefill-seqs 1, a short chunk "
        "then computes its own bucket's rows, not --chunk's); default: --chunk alone",
    )
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--layer-loop", default="scan")
    ap.add_argument(
        "--mixed-steps", default="auto", help="decode rows and prefill chunks in one call: on | off | auto"
    )
    add_step_form_arguments(ap)
    ap.add_argument("--cold-warm", type=int, default=4, help="adapters for the T7 cold/warm check")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="replays of each n's trace (the first is the run; all are recorded)",
    )
    add_attention_tunables_argument(ap)
    add_lora_fields_argument(ap)
    ap.add_argument(
        "--one-page-bucket", action="store_true", help="fewer compiles (the kernel reads only used pages)"
    )
    ap.add_argument("--rate-sweep", default="", help="extra rates run at the first n (latency vs rate)")
    ap.add_argument(
        "--partial", default=None, help="rewrite this JSON file with the runs so far after each run"
    )
    ap.add_argument("--finish", default=None, help="write a --partial file as the result, then stop")
    ap.add_argument(
        "--profile-window",
        default="",
        help="START,END seconds: after each n's run, replay its trace's arrivals before END again with "
        "a profiler trace over [START, END) (device time by kernel; the run's own figures are unprofiled)",
    )
    args = ap.parse_args()
    if args.finish:
        finish(args.finish)
        return
    args.input = tuple(int(v) for v in args.input.split(","))
    args.output = tuple(int(v) for v in args.output.split(","))
    extra = {int(v) for v in args.chunk_buckets.split(",") if v}
    if any(v <= 0 or v > args.chunk for v in extra):
        ap.error(f"--chunk-buckets {args.chunk_buckets} must lie in (0, --chunk = {args.chunk}]")
    args.chunk_buckets = tuple(sorted(extra | {args.chunk}))  # the compiled prompt-chunk lengths

    from bench.common import (
        override_attention_tunables,
        override_lora_fields,
        run_record,
        write_result,
    )
    from bench.kernels.timing import bandwidth, roofline_TBps
    from bench.plots import plot
    from bench.serving import cold_vs_warm, replay
    from bench.trace import adapter_ranks, slora_trace
    from checkpoints.peft import write_random_peft_adapter

    bw = bandwidth()
    override_attention_tunables(args)  # before the engine traces its steps
    override_lora_fields(args.lora_fields)
    engine, weight_bytes, startup = build_engine(args.model, args)
    c = engine.config
    print(
        f"engine up in {startup:.0f}s ({len(engine.paged.compiled)} steps compiled, each run once in "
        f"{engine.paged.warm_up_seconds:.1f}s); bandwidth {bw}",
        flush=True,
    )
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        paths: dict[int, list[str]] = {}

        def folder_for(rank: int, i: int) -> str:
            if rank not in paths:
                paths[rank] = []
                for j in range(DISTINCT):
                    p = os.path.join(folder, f"r{rank}_{j}")
                    write_random_peft_adapter(
                        p,
                        num_layers=c.num_hidden_layers,
                        module_shapes=c.module_shapes(),
                        rank=rank,
                        alpha=2 * rank,
                        target_modules=TARGETS,
                        seed=rank * 100 + j,
                        std=0.01,
                    )
                    paths[rank].append(p)
            return paths[rank][i % DISTINCT]

        plan = [(int(v), args.rate) for v in args.n.split(",")]
        plan += [(plan[0][0], float(r)) for r in args.rate_sweep.split(",") if r]
        for n, rate in plan:
            ranks = (
                adapter_ranks(n, tuple(int(r) for r in args.ranks.split(",")))
                if n <= args.mixed_up_to
                else [8] * n
            )
            names = [f"n{n}_a{i}" for i in range(n)]
            folders = [folder_for(rank, i) for i, rank in enumerate(ranks)]
            start = time.perf_counter()
            # from several threads, as a server registering many adapters would: reading and laying
            # out an adapter happen outside the engine's lock, and numpy and file reads release the GIL
            with ThreadPoolExecutor(LOAD_THREADS) as loaders:
                list(loaders.map(engine.load_adapter, names, folders))
            load_s = time.perf_counter() - start
            trace = slora_trace(n, args.alpha, rate, args.cv, args.duration, args.input, args.output)
            print(f"n={n}: {len(names)} adapters loaded in {load_s:.1f}s; {len(trace)} requests", flush=True)
            run_trace = functools.partial(
                replay,
                engine,
                adapter_names=names,
                vocab=c.vocab_size,
                bandwidth_Bps=roofline_TBps(bw) * 1e12,
                weight_bytes=weight_bytes,
            )
            result = run_trace(trace)
            if args.repeats > 1:  # the same trace again on the same engine: the run-to-run spread
                again = [run_trace(trace) for _ in range(args.repeats - 1)]
                result["repeats"] = [repeat_summary(r) for r in (result, *again)]
            result.update({"n": n, "rate": rate, "ranks": sorted(set(ranks)), "adapter_load_s": load_s})
            if args.profile_window:
                window = tuple(float(v) for v in args.profile_window.split(","))
                profiled = run_trace([r for r in trace if r.arrival < window[1]], profile_window=window)
                result["profiled_replay"] = profiled["profile"]
            if args.cold_warm:
                cold = [i for i, nm in enumerate(names) if not engine.paged.memory.is_resident(nm)]
                cold = cold[: args.cold_warm]
                if cold:
                    result["T7"] = cold_vs_warm(
                        engine, [names[i] for i in cold], vocab=c.vocab_size, ranks=[ranks[i] for i in cold]
                    )
            runs.append(result)
            print(json.dumps({k: v for k, v in result.items()}), flush=True)
            if args.partial:  # what finished survives a run stopped at a time limit: --finish writes it
                with open(args.partial, "w") as f:
                    partial = {
                        **run_record(),
                        **make_payload(args, bw, weight_bytes, startup, runs, engine.paged.warm_up_seconds),
                    }
                    json.dump(partial, f, indent=1, default=str)
            for name in names:  # the next n starts from a clean registry
                engine.unload_adapter(name)
    payload = make_payload(args, bw, weight_bytes, startup, runs, engine.paged.warm_up_seconds)
    print_table(runs)
    path = write_result(f"slora-trace-{args.model}", payload)
    print("wrote", path)
    print("plots", plot(path))


def print_table(runs: list[dict]) -> None:
    print(
        f"{'n':>6} {'rate':>5} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'slo':>5} {'roofline':>9} {'loads':>6}"
    )
    for r in runs:
        print(
            f"{r['n']:6d} {r['rate']:5.1f} {r['throughput_req_s']:7.2f} {r['throughput_tok_s']:8.1f} {r['ttft_s']['p50']:9.3f} "
            f"{r['ttft_s']['p99']:9.3f} {r['slo_attainment']:5.2f} {r['roofline_fraction']:9.2f} {r['adapter_loads']:6d}"
        )
        for kind, k in r.get("by_kind", {}).items():
            print(
                f"       {kind:8s} {k['steps']:5d} steps, {k['mean_step_ms']:6.2f} ms each "
                f"({k['mean_tokens']:.0f} tokens), roofline {k['roofline_fraction']:.2f}; median "
                f"{k.get('median_step_ms', float('nan')):.2f} ms (floor {k.get('median_floor_ms', float('nan')):.2f}), "
                f"host-paced {k.get('host_paced_steps', -1)}"
            )
            for p, kp in k.get("by_prompts", {}).items():
                print(
                    f"         {p} prompt(s) {kp['steps']:5d} steps, {kp['mean_step_ms']:6.2f} ms each "
                    f"({kp['mean_tokens']:.0f} tokens), roofline {kp['roofline_fraction']:.2f}"
                )
        if "host_ms_per_step" in r:
            print(
                "       host ms a step: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["host_ms_per_step"].items())
            )
        prof = r.get("profiled_replay", {}).get("kernels", {})
        if "device_busy_ms_per_step" in prof:
            print(
                f"       profiled: device busy {prof['device_busy_ms_per_step']:.2f} ms a step, idle "
                f"{prof['idle_ms_per_step_in_step_gaps']:.2f} in steps + {prof['idle_ms_per_step_between_steps']:.2f} between"
            )
            for row in prof["top"][:14]:
                print(
                    f"         {row['ms_per_step']:6.3f} ms {row['calls_per_step']:5.1f}x {row['kernel'][:70]}"
                )
        if "T7" in r:
            t7 = r["T7"]
            print(
                f"       T7: cold {t7['ttft_cold_s'] * 1e3:.1f} ms, warm {t7['ttft_warm_s'] * 1e3:.1f} ms, "
                f"decode step {t7['decode_step_s'] * 1e3:.1f} ms -> {t7['extra_in_decode_steps']:.2f} steps"
            )


def finish(partial_path: str) -> None:
    """Write a run's --partial file (a GPU run stopped at its time limit) as its result, with the run's
    own device, date, commit and command, and draw its plots."""
    from bench.common import write_result
    from bench.plots import plot

    with open(partial_path) as f:
        payload = json.load(f)
    recorded = {k: payload.pop(k) for k in ("device", "date", "commit", "command")}
    recorded["command"] += f" (stopped before its end; finished from {os.path.basename(partial_path)})"
    print_table(payload["runs"])
    path = write_result(f"slora-trace-{payload['workload']['model']}", payload, recorded)
    print("wrote", path)
    print("plots", plot(path))


if __name__ == "__main__":
    main()
