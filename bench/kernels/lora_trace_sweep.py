"""BGMV launch shapes at slora-trace's n = 5 decode shape: one decoder layer's LoRA (q/k/v in one group,
o alone, as the engine runs them) over 17 tokens that share 5 adapters of ranks 16, 32, 64, 16, 32 (the
rank bucket 64), each adapter drawn with probability ~ 1 / (its index + 1) as the trace's power law.

bench.kernels.lora tunes the small tier at decode-7b's layer (32 tokens, each its own rank-16 adapter,
bucket 16) on the H100; at n = 5 the bucket is 64, so every expand load is a [64, Dh] tile, and the
decode steps' LoRA kernels take 0.67 of their 5.7 ms on the H200 (mixed-step-args-none-*.json). This
sweep times the shrink and expand shapes, then the best pair with expand_lanes and decode by adapter,
each kernel from a profiler trace, and prints the LoraTunables fields to try in slora-trace (LORA=).

python -m bench.kernels.lora_trace_sweep [--tokens 17] [--ranks 16,32,64,16,32] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import write_result
from bench.kernels import lora as bench_lora
from bench.kernels.timing import device_kernel_seconds
from pallas_kernels.lora import LoraTunables, shapes
from pallas_kernels.lora.grouped_kernel import by_adapter_supported

H, DH, UNITS, ROT = bench_lora.H, bench_lora.DH, bench_lora.UNITS, bench_lora.ROT
MEMBERS = 4  # q, k, v (one group) and o


def adapter_rows(adapter_ranks: list[int]) -> tuple[list[list[list[tuple[int, int]]]], int]:
    """Every adapter's (A unit, B unit) pairs per member, laid out after the 8-unit zero page:
    rows[s][m][j]; and the pool's units."""
    rows, unit = [], 8
    for r in adapter_ranks:
        per_member = []
        for _ in range(MEMBERS):
            per_member.append([(unit + j * 2 * UNITS, unit + j * 2 * UNITS + UNITS) for j in range(r)])
            unit += r * 2 * UNITS
        rows.append(per_member)
    return rows, unit


def member_pairs(adapters: np.ndarray, rows, m: int, k: int) -> tuple[np.ndarray, ...]:
    """Member m's pairs of the tokens (token t uses adapter adapters[t]) grouped by token, padded to k
    pairs (token n_tokens, the zero page): token_index, a_start, b_start [k], offsets [n_tokens + 1]."""
    n = len(adapters)
    tok, a, b, off = np.full(k, n, np.int32), np.zeros(k, np.int32), np.zeros(k, np.int32), [0]
    i = 0
    for t, s in enumerate(adapters):
        for a_unit, b_unit in rows[s][m]:
            tok[i], a[i], b[i] = t, a_unit, b_unit
            i += 1
        off.append(i)
    return tok, a, b, np.asarray(off, np.int32)


def shared_layer_case(n_tokens: int, adapter_ranks: list[int], rng: np.random.Generator):
    """(pool, rotations, rank bucket): ROT draws of the tokens' adapters, each rotation the q/k/v
    group's (x, token_index, a_start, b_start, offsets) and o's (token_index, a_start, b_start, offsets)."""
    rows, units = adapter_rows(adapter_ranks)
    pool = (jax.random.normal(jax.random.PRNGKey(1), (1, units, DH), jnp.float32) * 0.05).astype(jnp.bfloat16)
    pool = pool.at[:, :8].set(0)
    k = n_tokens * max(adapter_ranks)
    weights = 1.0 / np.arange(1, len(adapter_ranks) + 1)
    rotations = []
    for i in range(ROT):
        adapters = rng.choice(len(adapter_ranks), n_tokens, p=weights / weights.sum())
        members = [member_pairs(adapters, rows, m, k) for m in range(MEMBERS)]
        group = [jnp.asarray(np.concatenate([mm[f] for mm in members[:3]])) for f in range(4)]
        x = jax.random.normal(jax.random.PRNGKey(10 + i), (n_tokens, H), jnp.float32).astype(jnp.bfloat16)
        rotations.append((x, *group, *(jnp.asarray(v) for v in members[3])))
    return pool, rotations, shapes.pow2_at_least(max(adapter_ranks))


def lora_kernels_us(times: dict[str, float]) -> float:
    """Microseconds a layer in the LoRA kernels (BGMV's or by adapter's: every Pallas kernel of the trace)."""
    return 1e6 * sum(v for k, v in times.items() if "bgmv" in k or "mosaic" in k.lower())


def variants(best: LoraTunables, bucket: int) -> list[tuple[str, LoraTunables]]:
    """The best shapes as swept, then with fewer expand lanes and decode by adapter."""
    out = [("best", best)]
    lanes = 16
    while lanes < bucket:
        out.append((f"expand_lanes {lanes}", dataclasses.replace(best, expand_lanes=lanes)))
        lanes *= 2
    if by_adapter_supported(bucket):
        out.append(("by adapter", dataclasses.replace(best, by_adapter_min_rank=bucket)))
    return out


def fields_changed(base: LoraTunables, new: LoraTunables) -> dict:
    """new's fields that differ from base's: the --lora-fields / LORA= to try."""
    b, n = dataclasses.asdict(base), dataclasses.asdict(new)
    return {k: v for k, v in n.items() if v != b[k]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=17)
    ap.add_argument("--ranks", default="16,32,64,16,32", help="the adapters' ranks")
    ap.add_argument("--quick", action="store_true", help="no sweep: the engine's shapes and the variants")
    args = ap.parse_args()
    adapter_ranks = [int(r) for r in args.ranks.split(",")]
    pool, rotations, bucket = shared_layer_case(args.tokens, adapter_ranks, np.random.default_rng(0))
    base = shapes.tunables_for(DH, args.tokens)  # the engine's tier for this batch
    base_times = device_kernel_seconds(bench_lora.decode_layer_op(base, bucket), (pool,), rotations)
    if base_times is None:
        raise SystemExit("this sweep reads kernel times from a GPU trace: run it on a GPU")
    print("engine's shapes:", f"{lora_kernels_us(base_times):.1f} us a layer", flush=True)
    best, rows = base, []
    if not args.quick:
        best, rows = bench_lora.sweep_launch_shapes(
            lambda t: bench_lora.decode_layer_op(t, bucket), pool, rotations, base, "trace layer"
        )
    results = [{"variant": "engine", "us": lora_kernels_us(base_times), "fields": {}}]
    for name, t in variants(best, bucket):
        try:
            times = device_kernel_seconds(bench_lora.decode_layer_op(t, bucket), (pool,), rotations)
        except Exception as e:  # a variant that cannot compile loses its row
            print(name, "failed:", repr(e)[:300], flush=True)
            continue
        results.append({"variant": name, "us": lora_kernels_us(times), "fields": fields_changed(base, t)})
        print(json.dumps(results[-1]), flush=True)
    path = write_result(
        "kernels-lora-trace",
        {
            "tokens": args.tokens,
            "adapter_ranks": adapter_ranks,
            "rank_bucket": bucket,
            "engine_tunables": dataclasses.asdict(base),
            "sweep": rows,
            "variants": results,
            "timing": "us: one layer's LoRA kernels (q/k/v group + o, shrink and expand), device time "
            "from a profiler trace of a chained loop",
        },
    )
    print("wrote", path)
    for r in sorted(results, key=lambda r: r["us"]):
        print(f"{r['us']:8.1f} us  {r['variant']:20s} {json.dumps(r['fields'])}")


if __name__ == "__main__":
    main()
