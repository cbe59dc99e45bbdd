"""Paged decode attention (BENCH.md T6): batch 64, context 2,048, page 16, over the unified pool;
the Pallas kernel and the pure-jnp reference, KV bytes / time against the copy and read bandwidth
measured in the same run. Llama-2-7B heads (32/32, MHA) and Llama-3-8B heads (32/8, GQA).

python -m bench.kernels.attention [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import write_result
from bench.kernels.timing import bandwidth, chained_seconds
from pallas_kernels.paged_attention import AttentionTunables, PrefillTunables, paged_attention

PAGE, DH = 16, 128


def trace_lengths(n: int, rows: int, seed: int = 0) -> np.ndarray:
    """Keys cached per row of a decode step in the S-LoRA trace: n sequences at a random point of their
    decode (prompt U[8, 512) + part of an output U[8, 512)), then rows - n padding rows with none."""
    rng = np.random.default_rng(seed)
    prompt, output = rng.integers(8, 512, n), rng.integers(8, 512, n)
    lens = prompt + (rng.random(n) * output).astype(np.int64)
    return np.concatenate([lens, np.zeros(rows - n, np.int64)]).astype(np.int32)


def _case(batch: int, context: int, hq: int, hkv: int, lens: np.ndarray | None = None, layers: int = 1):
    """batch rows of context - 1 cached keys each, or of lens[i] (rows with 0 are padding: the zero
    page, no keys) in tables of context // PAGE pages; a pool of `layers` equal layers (past 4 GB the
    kernels' offsets are 64-bit, as in a serving engine's pool)."""
    pages_per_seq = context // PAGE
    page_units = PAGE * 2 * hkv
    n_pages = 1 + batch * pages_per_seq
    pool = (jax.random.normal(jax.random.PRNGKey(0), (1, n_pages * page_units, DH), jnp.float32)).astype(
        jnp.bfloat16
    )
    if layers > 1:
        pool = jnp.tile(pool, (layers, 1, 1))
    rng = np.random.default_rng(0)
    tables = (1 + rng.permutation(batch * pages_per_seq)).reshape(batch, pages_per_seq).astype(np.int32)
    lens = np.full(batch, context - 1, np.int32) if lens is None else lens
    tables[lens == 0] = 0
    fixed = (
        pool,
        jnp.asarray(tables),
        jnp.asarray(lens[:, None]),
        jnp.asarray(lens),
        jnp.ones((batch,), jnp.int32),
    )
    rotations = []
    for i in range(2):
        k = jax.random.split(jax.random.PRNGKey(5 + i), 3)
        rotations.append(
            tuple(
                jax.random.normal(kk, (batch, 1, h, DH), jnp.float32).astype(jnp.bfloat16)
                for kk, h in zip(k, (hq, hkv, hkv))
            )
        )
    kv_bytes = int(lens.sum()) * 2 * hkv * DH * 2
    return fixed, rotations, kv_bytes


def _attend(pool, tables, pos, lens, new, q, k, v, layer: int = 0, **options):
    """paged_attention with the timed arguments first (chained_seconds rotates q, k, v), on the GPU
    kernels unless options say otherwise."""
    options = {"implementation": "pallas", **options}
    return paged_attention(q, k, v, pool, jnp.int32(layer), tables, pos, lens, new, page_size=PAGE, **options)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--stages", default="2", help="num_stages values to sweep, e.g. 2,3,4")
    ap.add_argument("--pages-per-block", default="2,4,8", help="pages_per_block values to sweep")
    ap.add_argument("--cases", default="mha,gqa", help="mha (Llama-2-7B heads), gqa (Llama-3-8B heads)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill kernel's sweep")
    ap.add_argument(
        "--split-keys", default="0", help="split_keys values for the tensor-core variant, e.g. 0,128,256"
    )
    ap.add_argument(
        "--longest-first",
        default="0",
        help="longest_first values for the tensor-core variant (0, 1 or 0,1): the grid walks the sequences "
        "by decreasing length",
    )
    ap.add_argument(
        "--trace-rows",
        type=int,
        default=0,
        help="N: --batch rows of which N decode at the S-LoRA trace's lengths (up to --context keys), the "
        "rest padding, as in a serving step's decode bucket; 0: every row at --context",
    )
    args = ap.parse_args()
    lens = trace_lengths(args.trace_rows, args.batch) if args.trace_rows else None
    if lens is not None and lens.max() >= args.context:
        ap.error(f"--context {args.context} must exceed the longest trace length {lens.max()}")
    stages = [int(v) for v in args.stages.split(",")]
    ppbs = [int(v) for v in args.pages_per_block.split(",")]
    cases = [c for c in (("llama2-7b MHA 32/32", 32, 32), ("llama3-8b GQA 32/8", 32, 8))]
    cases = [
        c for c in cases if ("MHA" in c[0] and "mha" in args.cases) or ("GQA" in c[0] and "gqa" in args.cases)
    ]
    bw = bandwidth()
    rows = []
    for label, hq, hkv in cases:
        fixed, rotations, kv_bytes = _case(args.batch, args.context, hq, hkv, lens)

        want = _attend(*fixed, *rotations[0], implementation="reference")
        sweep = []
        splits = [int(v) for v in args.split_keys.split(",")]
        orders = [bool(int(v)) for v in args.longest_first.split(",")]
        # (mma, split_keys, longest_first)
        variants = [(False, 0, False)] + [(True, k, o) for k in splits for o in orders]
        for ppb, warps, (mma, split, order), st in itertools.product(ppbs, (4, 8), variants, stages):
            t = AttentionTunables(
                pages_per_block=ppb,
                num_warps=warps,
                mma=mma,
                num_stages=st,
                split_keys=split,
                longest_first=order,
            )
            got = _attend(*fixed, *rotations[0], tunables=t)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            us = chained_seconds(lambda *a, t=t: _attend(*a, tunables=t), fixed, rotations, iters=20) * 1e6
            sweep.append({**dataclasses.asdict(t), "us": us, "max_abs_err": err})
            print(label, dataclasses.asdict(t), f"{us:.1f} us err {err:.2e}", flush=True)
        best = min(sweep, key=lambda s: s["us"])
        ref_us = (
            chained_seconds(lambda *a: _attend(*a, implementation="reference"), fixed, rotations, iters=20)
            * 1e6
        )
        row = {
            "case": label,
            "batch": args.batch,
            "context": args.context,
            "trace_rows": args.trace_rows,
            "kv_bytes": kv_bytes,
            "kernel_us": best["us"],
            "best": best,
            "reference_us": ref_us,
            "kernel_TBps": kv_bytes / best["us"] / 1e6,
            "reference_TBps": kv_bytes / ref_us / 1e6,
            "kernel_share_of_copy_bw": kv_bytes / best["us"] / 1e6 / bw["copy_TBps"],
            "kernel_share_of_read_bw": kv_bytes / best["us"] / 1e6 / bw["read_TBps"],
            "sweep": sweep,
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
    prefill = [] if args.no_prefill else prefill_rows(bw)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bandwidth": bw, "cases": rows, "prefill": prefill}, f, indent=1)
    print("wrote", write_result("kernels-attention", {"bandwidth": bw, "cases": rows, "prefill": prefill}))
    for r in rows:
        print(
            f"{r['case']:22s} kernel {r['kernel_us']:8.1f} us {r['kernel_TBps']:.2f} TB/s "
            f"({100 * r['kernel_share_of_copy_bw']:.0f}% copy bw) reference {r['reference_us']:8.1f} us"
        )


def prefill_rows(bw: dict, batch: int = 8, chunk: int = 256, cached: int = 1024) -> list[dict]:
    """Prefill chunks (chunk new tokens after `cached` in pages): the flash-style kernel against the
    reference, with its error; the figure that decides whether the GPU path turns the kernel on."""
    out = []
    for label, hq, hkv in (("prefill MHA 32/32", 32, 32), ("prefill GQA 32/8", 32, 8)):
        fixed, _, _ = _case(batch, cached + chunk, hq, hkv)
        pool, tables = fixed[0], fixed[1]
        pos = jnp.broadcast_to(jnp.arange(cached, cached + chunk, dtype=jnp.int32)[None], (batch, chunk))
        lens, new = jnp.full((batch,), cached, jnp.int32), jnp.full((batch,), chunk, jnp.int32)
        rotations = []
        for i in range(2):
            k = jax.random.split(jax.random.PRNGKey(9 + i), 3)
            rotations.append(
                tuple(
                    jax.random.normal(kk, (batch, chunk, h, DH), jnp.float32).astype(jnp.bfloat16)
                    for kk, h in zip(k, (hq, hkv, hkv))
                )
            )

        fixed = (pool, tables, pos, lens, new)
        want = _attend(*fixed, *rotations[0], prefill_kernel=False)
        ref_us = (
            chained_seconds(lambda *a: _attend(*a, prefill_kernel=False), fixed, rotations, iters=10) * 1e6
        )
        flops = 4 * batch * hq * chunk * (cached + chunk / 2) * DH
        for bq, warps in itertools.product((16, 32, 64), (4, 8)):
            t = PrefillTunables(block_queries=bq, num_warps=warps)
            try:
                got = _attend(*fixed, *rotations[0], prefill_kernel=True, prefill_tunables=t)
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
                us = (
                    chained_seconds(
                        lambda *a, t=t: _attend(*a, prefill_kernel=True, prefill_tunables=t),
                        fixed,
                        rotations,
                        iters=10,
                    )
                    * 1e6
                )
            except Exception as e:  # noqa: BLE001 - a tiling Triton refuses is a result, not a crash
                out.append({"case": label, **dataclasses.asdict(t), "error": repr(e)[:300]})
                continue
            row = {
                "case": label,
                **dataclasses.asdict(t),
                "kernel_us": us,
                "reference_us": ref_us,
                "kernel_TFLOPs": flops / us / 1e6,
                "max_abs_err": err,
            }
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    main()
