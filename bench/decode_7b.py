"""decode-7b (../shared/BENCH.md) through jlora's paged engine: Llama-2-7B geometry, random bf16
weights, batch 32, prompt 128, 128 new tokens, greedy; base-only and every request its own rank-16
q/k/v/o adapter; bandwidth measured in the same run; HF transformers + PEFT peer figures merged in.

python -m bench.decode_7b [--peer FILE] [--batch 32] [--layers 32] [--impl reference|auto] [--layer-loop scan|unrolled]
                         [--hlo FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np

PROMPT, NEW, RANK = 128, 128, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_params(config, mesh, unrolled: bool):
    """Random bf16 weights created in place (already split over the mesh); with unrolled=True one
    layer at a time as per-layer buffers, so a large model never exists twice on a device."""

    import jax
    import jax.numpy as jnp

    from jlora.model.llama import random_params
    from jlora.sharding import param_shardings

    def build(cfg, key):
        fn = lambda k: random_params(cfg, k, jnp.bfloat16)  # noqa: E731
        shardings = param_shardings(jax.eval_shape(fn, key), mesh) if mesh is not None else None
        return jax.jit(fn, out_shardings=shardings)(key)

    if not unrolled:
        return build(config, jax.random.PRNGKey(0))
    one = dataclasses.replace(config, num_hidden_layers=1)
    top = build(one, jax.random.PRNGKey(0))
    layers = []
    for i in range(config.num_hidden_layers):
        layer = build(one, jax.random.PRNGKey(i + 1))["layers"]
        layers.append(jax.tree.map(lambda x: x[0], layer))
    return {**top, "layers": layers}


def pool_pages(config, mp: int, batch: int, pages_per_seq: int) -> int:
    """Pages for every request's whole KV and its own adapter at once, with room to spare. An adapter's
    pages depend on the geometry and on mp (jlora.engine.pool_layout): Llama-2-70B, rank 16 q/k/v/o,
    25 pages at mp 1 and 74 at mp 4; sizing for 7B's 8 left room for 12 / 7 / 4 adapters and ran
    smaller batches than 32."""
    from jlora.engine import pool_layout
    from jlora.pool.memory import PoolManager

    layout = pool_layout(config, num_pages=1, page_size=16, lora_modules=TARGETS, shards=mp)
    adapter = PoolManager(layout).adapter_pages_needed({m: RANK for m in TARGETS})
    return 1 + batch * (pages_per_seq + adapter) + 64  # page 0 is reserved


def set_lora_tunables(spec: str, head_dim: int) -> dict:
    """Replace the tuned LoRA kernel shapes for this head_dim (pallas_kernels.lora.shapes.TUNED) before
    the engine compiles: spec is a JSON object or a bench.kernels.lora result file."""
    from pallas_kernels.lora import shapes

    if spec.lstrip().startswith("{"):
        tiers = [[1 << 30, json.loads(spec)]]
    else:
        with open(spec) as f:
            result = json.load(f)
        tiers = result.get("tuned_tiers") or [[1 << 30, result["tuned"]]]
    shapes.TUNED[head_dim] = tuple((int(n), shapes.LoraTunables(**fields)) for n, fields in tiers)
    print("LoRA tunables:", shapes.TUNED[head_dim], flush=True)
    return {"tiers": [[n, dataclasses.asdict(t)] for n, t in shapes.TUNED[head_dim]]}


def engine_configs(config, mp: int, batch: int, new_tokens: int, **overrides):
    """The decode-7b engine shape: one decode bucket of the batch, prefill 8 x PROMPT, rank-16 buckets,
    a pool that holds every request's KV and its own adapter at once. (EngineConfig, SchedulerConfig)."""
    from jlora.config import EngineConfig
    from jlora.scheduler import SchedulerConfig

    pages_per_seq = -(-(PROMPT + new_tokens) // 16)
    ec = EngineConfig(
        page_size=16,
        num_pages=pool_pages(config, mp, batch, pages_per_seq),
        max_model_len=PROMPT + new_tokens,
        max_batch=batch,
        decode_batch_buckets=(batch,),
        prefill_batch_buckets=(8,),
        prefill_chunk_buckets=(PROMPT,),
        page_buckets=(pages_per_seq,),
        lora_rank_buckets=(RANK,),
        lora_modules=TARGETS,
        compilation_cache_dir=None,
        greedy_only=True,
        **overrides,
    )
    sched = SchedulerConfig(
        max_batch=batch,
        max_prefill_tokens=8 * PROMPT,
        max_prefill_seqs=8,
        max_chunk=PROMPT,
        max_model_len=PROMPT + new_tokens,
    )
    return ec, sched


def load_random_adapters(engine, config, count: int, ranks: tuple[int, ...] = (RANK,)) -> list[str]:
    """count random q/k/v/o adapters (adapter i of rank ranks[i % len(ranks)]; rank 16 unless told),
    written as PEFT folders and loaded the normal way."""
    from checkpoints.peft import write_random_peft_adapter

    names = [f"a{i}" for i in range(count)]
    with tempfile.TemporaryDirectory() as folder:
        for i, n in enumerate(names):
            rank = ranks[i % len(ranks)]
            write_random_peft_adapter(
                os.path.join(folder, n),
                num_layers=config.num_hidden_layers,
                module_shapes=config.module_shapes(),
                rank=rank,
                alpha=2 * rank,
                target_modules=list(TARGETS),
                seed=i,
                std=0.01,
            )
            engine.load_adapter(n, os.path.join(folder, n))
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--impl", default="auto", help="reference | auto (Pallas kernels on GPU)")
    ap.add_argument("--layer-loop", default="unrolled", help="scan | unrolled")
    ap.add_argument("--hlo", default=None, help="write the compiled mixed decode step's HLO here")
    ap.add_argument("--tag", default="", help="appended to the result name")
    ap.add_argument(
        "--profile", action="store_true", help="trace 10 decode steps of each run: kernel time by name"
    )
    ap.add_argument("--geometry", default="llama2-7b", help="a preset of jlora.config.PRESETS")
    ap.add_argument("--mp", type=int, default=1, help="model-parallel ways (tensor parallelism over a mesh)")
    ap.add_argument("--skip-base", action="store_true", help="only the mixed-adapter run")
    ap.add_argument("--prefill-attention", default="auto", help="kernel | reference | auto (EngineConfig)")
    ap.add_argument("--fuse-lora", default="auto", help="off | on | auto (EngineConfig)")
    ap.add_argument(
        "--fuse-projections", default="auto", help="q/k/v and gate/up as one matmul each: off | on | auto"
    )
    ap.add_argument(
        "--no-overlap", action="store_true", help="run each step to the end before the next (EngineConfig)"
    )
    ap.add_argument(
        "--lora-tunables",
        default=None,
        help="LoraTunables for the run, replacing the tuned ones: a JSON object, or a bench.kernels.lora "
        "result file (its 'tuned')",
    )
    args = ap.parse_args()

    import jax

    import jlora
    from bench.common import batch_filled, step_weight_bytes, write_result
    from bench.kernels.timing import bandwidth, roofline_TBps
    from bench.profile import host_breakdown, kernel_breakdown
    from jlora.config import PRESETS, MeshConfig
    from jlora.loader import LoadedModel
    from jlora.sharding import make_mesh

    b = args.batch
    bw = bandwidth()
    config = dataclasses.replace(PRESETS[args.geometry], num_hidden_layers=args.layers)
    lora_tunables = set_lora_tunables(args.lora_tunables, config.head_dim) if args.lora_tunables else None
    mesh = make_mesh(MeshConfig(model=args.mp)) if args.mp > 1 else None
    unrolled = args.layer_loop == "unrolled" or (args.layer_loop == "auto" and jax.default_backend() == "gpu")
    params = make_params(config, mesh, unrolled=unrolled)
    weight_bytes = step_weight_bytes(params, config.tie_word_embeddings)
    ec, sched = engine_configs(
        config,
        args.mp,
        b,
        NEW,
        implementation=args.impl,
        layer_loop=args.layer_loop,
        prefill_attention=args.prefill_attention,
        fuse_lora=args.fuse_lora,
        fuse_projections=args.fuse_projections,
        overlap=not args.no_overlap,
    )
    start = time.perf_counter()
    engine = jlora.Engine(
        LoadedModel(config, params, None, {}, "random"), ec, scheduler_config=sched, mesh=mesh
    )

    compile_s = time.perf_counter() - start
    if args.hlo:
        name = next(n for n in engine.paged.compiled if n.startswith("decode") and not n.endswith("_r0"))
        with open(args.hlo, "w") as f:
            f.write(engine.paged.compiled[name].as_text())

    names = load_random_adapters(engine, config, b)
    adapter_bytes = (
        engine.paged.memory.adapter_pages_needed({m: RANK for m in TARGETS})
        * engine.paged.layout.page_bytes(2)
        * engine.paged.shards
    )

    # a decode step's time: the interval between the ends of consecutive decode-only steps (with host
    # overlap the next step is already queued when one ends, so this is the step period)
    step_times: dict[str, list[float]] = {}
    step_rows: dict[str, list[int]] = {}  # requests in each timed decode step: b unless memory fell short
    original = engine.paged.collect
    last_end: dict[str, float] = {}

    profiles = {}
    trace_root = tempfile.mkdtemp()

    def timed_collect(inflight):
        label = timed_collect.label
        decode = all(call.kind == "decode" for call in inflight.calls)
        n = len(step_times.get(label, []))
        tracing = decode and label.startswith("profile:")  # a separate pass: tracing costs time
        out = original(inflight)  # host values: the step has finished
        end = time.perf_counter()
        if decode and label in last_end:
            step_times.setdefault(label, []).append(end - last_end[label])
            step_rows.setdefault(label, []).append(sum(len(c.sample_rows) for c in inflight.calls))
        if decode:
            last_end[label] = end
        else:
            last_end.pop(label, None)
        if tracing and n == 20:
            jax.profiler.start_trace(os.path.join(trace_root, label))
        if tracing and n == 30:
            jax.profiler.stop_trace()
            try:  # a profile that cannot be read must not lose the timings
                profiles[label.split(":", 1)[1]] = kernel_breakdown(os.path.join(trace_root, label), steps=10)
                profiles[label.split(":", 1)[1]]["host"] = host_breakdown(
                    os.path.join(trace_root, label), steps=10
                )
            except Exception as e:  # noqa: BLE001
                profiles[label.split(":", 1)[1]] = {"error": repr(e)}
        return out

    engine.paged.collect = timed_collect
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 32000, PROMPT).tolist() for _ in range(b)]
    params_ = jlora.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    results = {}
    runs = (("mixed", names),) if args.skip_base else (("base", [None] * b), ("mixed", names))
    for label, adapters in runs:
        timed_collect.label = "warm"
        engine.generate(
            prompts, jlora.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), adapters=adapters
        )
        timed_collect.label = label
        phases0, steps0 = dict(engine.runner.phase_seconds), engine.runner.steps
        stats0 = dict(engine.runner.scheduler.stats)
        start = time.perf_counter()
        engine.generate(prompts, params_, adapters=adapters)
        seconds = time.perf_counter() - start
        n_steps = engine.runner.steps - steps0
        host_ms = {
            k: (v - phases0.get(k, 0.0)) / n_steps * 1e3 for k, v in engine.runner.phase_seconds.items()
        }
        print(
            label,
            f"{b * NEW / seconds:.0f} tok/s end to end, decode step {np.median(step_times[label]) * 1e3:.2f} ms",
            flush=True,
        )
        if args.profile:
            timed_collect.label = f"profile:{label}"
            engine.generate(prompts, params_, adapters=adapters)
        decode = np.median(step_times[label])
        rows = float(np.mean(step_rows[label]))
        if not batch_filled(rows, b):
            print(f"WARNING {label}: decode steps ran {rows:.1f} requests on average, not {b}", flush=True)
        # roofline of a decode step: weights + the KV read (mean context) + each active adapter once
        kv_bytes = b * (PROMPT + NEW / 2) * 2 * config.num_hidden_layers * config.kv_dim * 2
        floor_bytes = weight_bytes + kv_bytes + (adapter_bytes * b if label == "mixed" else 0)
        floor_s = floor_bytes / args.mp / (roofline_TBps(bw) * 1e12)  # every device reads its shard
        results[label] = {
            "tok_s_end_to_end": b * NEW / seconds,
            "decode_step_ms": decode * 1e3,
            "decode_tok_s": rows / decode,
            "mean_decode_rows": rows,
            "step_floor_ms": floor_s * 1e3,
            "roofline_fraction": floor_s / decode,
            "host_ms_per_step": host_ms,  # the runner's phases (all steps, prefill included)
            "scheduler_stats": {k: v - stats0.get(k, 0) for k, v in engine.runner.scheduler.stats.items()},
        }
        print(label, "host ms/step:", {k: round(v, 3) for k, v in host_ms.items()}, flush=True)
    mixed = results["mixed"]
    base = results.get("base")  # None with --skip-base: no T3 without a base run beside it
    lora_floor_ms = 1.1 * adapter_bytes * b / args.mp / (roofline_TBps(bw) * 1e12) * 1e3
    payload = {
        "workload": {
            "geometry": args.geometry,
            "mp": args.mp,
            "layers": config.num_hidden_layers,
            "dtype": "bfloat16",
            "batch": b,
            "prompt": PROMPT,
            "new_tokens": NEW,
            "adapters": b,
            "rank": RANK,
            "targets": list(TARGETS),
            "implementation": ec.implementation,
            "lora_tunables": lora_tunables,
            "layer_loop": ec.layer_loop,
            "prefill_attention": ec.prefill_attention,
            "fuse_lora": ec.fuse_lora,
            "fuse_projections": ec.fuse_projections,
            "overlap": ec.overlap,
            "lora_groups": [list(g) for g in ec.lora_groups()],
        },
        "bandwidth": bw,
        "weight_bytes": weight_bytes,
        "adapter_bytes_each": adapter_bytes,
        "compile_s": compile_s,
        "jlora": results,
        "profile": profiles,
    }
    if base is not None:
        payload["T3"] = {
            "mixed_step_ms": mixed["decode_step_ms"],
            "allowed_ms": base["decode_step_ms"] + lora_floor_ms,
            "met": mixed["decode_step_ms"] <= base["decode_step_ms"] + lora_floor_ms,
        }
    if args.peer and os.path.exists(args.peer):
        with open(args.peer) as f:
            peer = json.load(f)
        payload["hf"] = peer
        ratio = mixed["tok_s_end_to_end"] / peer["hf_peft_mixed_tok_s"]
        payload["T2"] = {
            "vs_peft_mixed": ratio,
            "roofline_fraction": mixed["roofline_fraction"],
            "met": ratio >= 100 and mixed["roofline_fraction"] >= 0.8,
        }
    print(json.dumps(payload, indent=1, default=_plain))
    for label, prof in profiles.items():
        print(
            label,
            f"collectives {prof.get('collective_ms_per_step', 0):.2f} ms/step, device busy {prof.get('device_busy_ms_per_step', 0):.2f} ms/step,",
            f"{prof.get('kernels_per_step', 0):.0f} kernels/step, idle {prof.get('idle_ms_per_step_in_step_gaps', 0):.2f}"
            f" ms in gaps < 0.1 ms and {prof.get('idle_ms_per_step_between_steps', 0):.2f} ms in longer gaps",
        )
        for row in prof.get("top", [])[:15]:
            print(f"   {row['ms_per_step']:7.3f} ms {row['calls_per_step']:6.1f}x  {row['kernel'][:90]}")
        print(label, "host, per step:")
        for row in prof.get("host", {}).get("top", [])[:20]:
            print(f"   {row['ms_per_step']:7.3f} ms {row['calls_per_step']:6.1f}x  {row['event'][:110]}")
    if base is not None:
        print(
            f"base {base['decode_step_ms']:.2f} ms/step ({base['roofline_fraction']:.0%} of floor), ", end=""
        )
    print(
        f"mixed {mixed['decode_step_ms']:.2f} ms ({mixed['roofline_fraction']:.0%} of floor), "
        f"T3 allows {lora_floor_ms:.2f} ms over base"
    )
    print("wrote", write_result("decode-7b" + args.tag, payload))


def _plain(o):
    return o.item() if hasattr(o, "item") else str(o)


if __name__ == "__main__":
    main()
