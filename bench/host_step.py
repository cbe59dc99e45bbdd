"""Host time per engine step for the decode-7b batch shape: 32 requests, each its own rank-16
q/k/v/o adapter, 16-token pages, prompt 128, 128 new tokens - on a tiny random model, so that the
device's share is small and what is left is the runner's own work (schedule, prepare, launch,
consume). Runs anywhere; at mp 4 on the GPU this host work, not the device, set the step time.

python -m bench.host_step [--new 128] [--fuse-lora auto] [--overlap 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

BATCH = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128, help="new tokens per request")
    ap.add_argument("--fuse-lora", default="auto")
    ap.add_argument("--overlap", type=int, default=1)
    ap.add_argument(
        "--hidden", type=int, default=256, help="8192 with --kv-heads 8: Llama-2-70B's adapter layout"
    )
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import jlora
    from bench.common import write_result
    from bench.decode_7b import PROMPT, RANK, TARGETS, engine_configs, load_random_adapters
    from jlora.config import ModelConfig
    from jlora.loader import LoadedModel
    from jlora.model.llama import random_params

    config = ModelConfig(
        architecture="llama",
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=128,
        max_position_embeddings=4096,
    )
    params = random_params(config, jax.random.PRNGKey(0), jnp.float32)
    ec, sched = engine_configs(
        config, 1, BATCH, args.new, fuse_lora=args.fuse_lora, overlap=bool(args.overlap)
    )
    engine = jlora.Engine(LoadedModel(config, params, None, {}, "random"), ec, scheduler_config=sched)
    names = load_random_adapters(engine, config, BATCH)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, PROMPT).tolist() for _ in range(BATCH)]
    sampling = jlora.SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    engine.generate(
        prompts, jlora.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), adapters=names
    )
    rows: list[int] = []  # requests in each decode call: the batch unless the pool fell short
    prepare = engine.paged.prepare

    def counting_prepare(schedule, *a, **kw):
        if schedule.decodes:
            rows.append(len(schedule.decodes))
        return prepare(schedule, *a, **kw)

    engine.paged.prepare = counting_prepare
    phases0, steps0 = dict(engine.runner.phase_seconds), engine.runner.steps
    start = time.perf_counter()
    engine.generate(prompts, sampling, adapters=names)
    seconds = time.perf_counter() - start
    steps = engine.runner.steps - steps0
    host_ms = {k: (v - phases0.get(k, 0.0)) / steps * 1e3 for k, v in engine.runner.phase_seconds.items()}
    payload = {
        "workload": {
            "batch": BATCH,
            "prompt": PROMPT,
            "new_tokens": args.new,
            "rank": RANK,
            "targets": list(TARGETS),
            "fuse_lora": args.fuse_lora,
            "overlap": bool(args.overlap),
            "model": f"tiny random (2 layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads)",
        },
        "steps": steps,
        "mean_decode_rows": float(np.mean(rows)),
        "max_decode_rows": max(rows),
        "scheduler_stats": dict(engine.runner.scheduler.stats),
        "step_ms": seconds / steps * 1e3,
        "host_ms_per_step": host_ms,
        "host_work_ms_per_step": sum(v for k, v in host_ms.items() if k != "wait"),
    }
    print(
        f"{steps} steps, {payload['step_ms']:.2f} ms/step; host ms/step:",
        {k: round(v, 3) for k, v in host_ms.items()},
        f"work {payload['host_work_ms_per_step']:.2f} ms; requests per decode step {payload['mean_decode_rows']:.1f}"
        f" (max {payload['max_decode_rows']}), scheduler {payload['scheduler_stats']}",
    )
    print("wrote", write_result("host-step", payload))


if __name__ == "__main__":
    main()
