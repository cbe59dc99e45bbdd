"""Gathered LoRA shrink+expand at decode shapes (BENCH.md T5): the Pallas BGMV kernel reading the
unified pool, its pure-jnp reference, the XLA per-token gather einsum, the one-hot einsum over all
slots (sglang-jax, tpu-inference) and jax.lax.ragged_dot; bytes moved / time against the copy
bandwidth measured in the same run. One projection, h_in = h_out = 4096, bf16.

python -m bench.kernels.lora [--out FILE] [--quick] [--fused] [--no-sweep]

Kernels are timed two ways: whole calls chained in one jit (as the peers) and, on a GPU, by device time
per kernel from a profiler trace. The sweep tunes shrink and expand shapes separately at T5's 256
tokens and at decode-7b's layer (32 tokens) and writes them as tiers (`tuned_tiers`, for
pallas_kernels.lora.shapes.TUNED and `bench.decode_7b --lora-tunables`).
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
from bench.kernels.timing import bandwidth, chained_seconds, device_kernel_seconds, roofline_TBps
from pallas_kernels.lora import LoraTunables, lora_decode, lora_decode_group, shapes

H, DH = 4096, 128
UNITS = H // DH
ROT = 4
FUSED_TOKENS = (8, 32, 128, 256)
DECODE_BATCH = 32
KERNEL_IMPL = "pallas"  # "interpret" for a CPU smoke run


def _pool_case(n_tokens: int, ranks: list[int], rng: np.random.Generator):
    """The unified pool holding every slot's rows, and ROT rotations of (x, token pairs) on distinct slots."""
    starts, unit = [], 8
    for r in ranks:
        starts.append([(unit + j * 2 * UNITS, unit + j * 2 * UNITS + UNITS) for j in range(r)])
        unit += r * 2 * UNITS
    pool = (jax.random.normal(jax.random.PRNGKey(1), (1, unit, DH), jnp.float32) * 0.05).astype(jnp.bfloat16)
    pool = pool.at[:, :8].set(0)
    k = n_tokens * max(ranks)
    rotations, slot_sets = [], []
    for i in range(ROT):
        slots = rng.choice(len(ranks), n_tokens, replace=False)
        slot_sets.append(slots)
        tok, a, b = np.full(k, n_tokens, np.int32), np.zeros(k, np.int32), np.zeros(k, np.int32)
        offsets = np.zeros(n_tokens + 1, np.int32)
        n = 0
        for t, s in enumerate(slots):
            for ai, bi in starts[s]:
                tok[n], a[n], b[n] = t, ai, bi
                n += 1
            offsets[t + 1] = n
        x = (jax.random.normal(jax.random.PRNGKey(10 + i), (n_tokens, H), jnp.float32)).astype(jnp.bfloat16)
        rotations.append((x, *(jnp.asarray(v) for v in (tok, a, b, offsets))))
    return pool, rotations, slot_sets


def _decode_layer_case(n_tokens: int, rng: np.random.Generator):
    """One decoder layer's LoRA at decode as the engine runs it on the GPU (fuse_lora): q, k and v in one
    lora_decode_group, o alone; every token its own rank-16 adapter (distinct ones per projection).
    (layer(tunables) -> op, pool, rotations)."""
    n, r = n_tokens, 16
    pool, rotations, _ = _pool_case(4 * n, [r] * (4 * n), rng)  # 4n tokens: q, k, v, o rows of n each

    def split(rot):
        x, tok, a, b, off = rot
        per = n * r  # every token has exactly r pairs: projection m's pairs are [m*per, (m+1)*per)
        parts = [
            (tok[m * per : (m + 1) * per] - m * n, a[m * per : (m + 1) * per], b[m * per : (m + 1) * per])
            for m in range(4)
        ]
        offs = [off[m * n : (m + 1) * n + 1] - off[m * n] for m in range(4)]
        group = tuple(jnp.concatenate([p[i] for p in parts[:3]]) for i in range(3))
        return (x[:n], *group, jnp.concatenate(offs[:3]), *parts[3], offs[3])

    return lambda tunables: decode_layer_op(tunables, r), pool, [split(rot) for rot in rotations]


def decode_layer_op(tunables: LoraTunables, max_rank: int, impl: str | None = None):
    """One layer's decode LoRA as the engine runs it on the GPU: q/k/v in one lora_decode_group, then o;
    op(pool, x, q/k/v's token_index, a_start, b_start, offsets, o's the same) -> [N, 4H]."""

    def op(pool, x, tok, a, b, off, tok_o, a_o, b_o, off_o):
        kw = dict(implementation=impl or KERNEL_IMPL, tunables=tunables, max_rank=max_rank)
        qkv = lora_decode_group(x, pool, jnp.int32(0), tok, a, b, off, (H, H, H), **kw)
        o = lora_decode(x, pool, jnp.int32(0), tok_o, a_o, b_o, H, off_o, **kw)
        return jnp.concatenate([qkv, o], axis=1)

    return op


def _kernel_split(times: dict[str, float]) -> tuple[float, float | None]:
    """Seconds in the BGMV shrink and expand kernels (Triton's bgmv_expand or the Mosaic GPU one) of
    one traced call; expand None when no kernel of the trace is recognisably an expand."""
    shrink = sum(v for k, v in times.items() if "bgmv_shrink" in k)
    expand = [v for k, v in times.items() if "bgmv_expand" in k or "mosaic" in k.lower()]
    return shrink, (sum(expand) if expand else None)


SHRINK_SHAPES = [(c, p, w) for c in (4, 8, 16, 32) for p in (1, 4) for w in (1, 2, 4)]
EXPAND_SHAPES = [(u, w, "triton") for u in (1, 2, 4, 8) for w in (1, 2, 4, 8)]
EXPAND_SHAPES += [(u, 4, "mosaic") for u in (1, 2, 4, 8)]  # Mosaic GPU: one warpgroup per program


def sweep_launch_shapes(op_for, pool, rotations, base: LoraTunables, label: str):
    """Shrink shapes (chunk_units, shrink_pairs, shrink_num_warps) and expand shapes (out_units,
    num_warps) side by side, one traced call each, each kernel timed alone from the trace; the best of
    each kind together. (best tunables, rows)."""
    rows = []
    for i in range(max(len(SHRINK_SHAPES), len(EXPAND_SHAPES))):
        (chunk, pairs, s_warps), (out_units, e_warps, backend) = (
            SHRINK_SHAPES[i % len(SHRINK_SHAPES)],
            EXPAND_SHAPES[i % len(EXPAND_SHAPES)],
        )
        t = dataclasses.replace(
            base,
            chunk_units=chunk,
            shrink_pairs=pairs,
            shrink_num_warps=s_warps,
            out_units=out_units,
            num_warps=e_warps,
            wide_num_warps=0,  # num_warps at every load width: the swept one
            expand_backend=backend,
        )
        try:
            times = device_kernel_seconds(op_for(t), (pool,), rotations)
        except Exception as e:  # a shape one backend cannot compile loses its row, not the sweep
            print(label, "failed:", dataclasses.asdict(t), repr(e)[:400], flush=True)
            continue
        if times is None:
            raise SystemExit("the launch-shape sweep reads kernel times from a GPU trace: run it on a GPU")
        shrink, expand = _kernel_split(times)
        rows.append(
            {
                **dataclasses.asdict(t),
                "shrink_us": shrink * 1e6,
                "expand_us": None if expand is None else expand * 1e6,
                "kernels": sorted(times) if expand is None or i < 2 or backend == "mosaic" else None,
            }
        )
        print(label, rows[-1], flush=True)
    s = min(rows, key=lambda r: r["shrink_us"])
    e = min((r for r in rows if r["expand_us"] is not None), key=lambda r: r["expand_us"])
    best = dataclasses.replace(
        base,
        chunk_units=s["chunk_units"],
        shrink_pairs=s["shrink_pairs"],
        shrink_num_warps=s["shrink_num_warps"],
        out_units=e["out_units"],
        num_warps=e["num_warps"],
        wide_num_warps=0,
        expand_backend=e["expand_backend"],
    )
    return best, rows


def _dense(ranks: list[int]):
    """The same adapters as dense stacks padded to the largest rank: A [S, H, r], B [S, r, H]."""
    s, r = len(ranks), max(ranks)
    a = (jax.random.normal(jax.random.PRNGKey(2), (s, H, r), jnp.float32) * 0.05).astype(jnp.bfloat16)
    b = (jax.random.normal(jax.random.PRNGKey(3), (s, r, H), jnp.float32) * 0.05).astype(jnp.bfloat16)
    return a, b


def gather_einsum(a, b, x, idx):
    s = jnp.einsum("NH,NHR->NR", x, a[idx], preferred_element_type=jnp.float32)
    return jnp.einsum("NR,NRO->NO", s.astype(x.dtype), b[idx], preferred_element_type=jnp.float32).astype(
        x.dtype
    )


def one_hot_einsum(a, b, x, idx):
    slots, _, r = a.shape
    mask = jax.nn.one_hot(idx, slots, dtype=x.dtype)  # [N, S]
    s = jnp.einsum("NH,SHR->NSR", x, a, preferred_element_type=jnp.float32).astype(x.dtype) * mask[:, :, None]
    return jnp.einsum("NSR,SRO->NO", s, b, preferred_element_type=jnp.float32).astype(x.dtype)


def ragged(a, b, x, idx):
    order = jnp.argsort(idx)
    sizes = jnp.bincount(idx, length=a.shape[0]).astype(jnp.int32)
    s = jax.lax.ragged_dot(x[order], a, sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    o = jax.lax.ragged_dot(s, b, sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.zeros_like(o).at[order].set(o)


def _kernel_op(tunables, max_rank: int, impl: str | None = None):
    def op(pool, x, tok, a, b, off):
        return lora_decode(
            x,
            pool,
            jnp.int32(0),
            tok,
            a,
            b,
            H,
            off,
            implementation=impl or KERNEL_IMPL,
            tunables=tunables,
            max_rank=max_rank,
        )

    return op


def _identity(*args):
    """The harness alone: the rotation's x ([N, H], the size of every op's output) through the checksum."""
    return next(a for a in args if a.ndim == 2 and a.shape[1] == H)


def _device_us(op, fixed, rotations, harness_busy: float | None) -> float | None:
    """The op's own device time per call: all kernels of a traced call less the harness's."""
    times = device_kernel_seconds(op, fixed, rotations)
    if times is None or harness_busy is None:
        return None
    return (times["busy"] - harness_busy) * 1e6


def run_case(name, n_tokens, ranks, bw, rng, tiers, peers=True, check=True):
    pool, rotations, slot_sets = _pool_case(n_tokens, ranks, rng)
    used = [sum(ranks[s] for s in slots) for slots in slot_sets]
    adapter_bytes = float(np.mean(used)) * 2 * H * 2  # A and B rows of the active adapters
    floor_bytes = adapter_bytes + 2 * n_tokens * H * 2  # + x read + delta written
    floor_s = floor_bytes / (roofline_TBps(bw) * 1e12)
    tunables = next(t for n, t in tiers if n_tokens <= n)
    kernel = _kernel_op(tunables, max(ranks))
    row = {
        "case": name,
        "tokens": n_tokens,
        "slots": len(ranks),
        "active_rank_rows": float(np.mean(used)),
        "floor_us": floor_s * 1e6,
        "tunables": dataclasses.asdict(tunables),
    }
    if check:  # correctness at the timed shape, against the reference
        got = kernel(pool, *rotations[0])
        want = _kernel_op(tunables, max(ranks), "reference")(pool, *rotations[0])
        err = float(
            jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
            / jnp.max(jnp.abs(want.astype(jnp.float32)))
        )
        row["kernel_rel_err"] = err
    # chained: whole calls in the harness (its slicing and checksum kernels and per-iteration cost
    # included), as the peers are timed; device: the BGMV kernels alone, from a trace
    row["kernel_us"] = chained_seconds(kernel, (pool,), rotations) * 1e6
    times = device_kernel_seconds(kernel, (pool,), rotations)
    if times is not None:
        shrink, expand = _kernel_split(times)
        row["kernel_device_us"] = (shrink + (expand or 0.0)) * 1e6
        row["shrink_device_us"], row["expand_device_us"] = shrink * 1e6, (expand or 0.0) * 1e6
        row["kernel_device_x_floor"] = row["kernel_device_us"] / row["floor_us"]
        for backend in ("triton", "mosaic"):  # both expands at this shape, side by side
            other = dataclasses.replace(tunables, expand_backend=backend)
            try:
                expand = _kernel_split(
                    device_kernel_seconds(_kernel_op(other, max(ranks)), (pool,), rotations)
                )[1]
                row[f"expand_{backend}_device_us"] = None if expand is None else expand * 1e6
            except Exception as e:
                row[f"expand_{backend}_device_us"] = repr(e)[:200]
    row["reference_us"] = (
        chained_seconds(_kernel_op(tunables, max(ranks), "reference"), (pool,), rotations) * 1e6
    )
    if peers:
        a, b = _dense(ranks)
        idx_rot = [(rotations[i][0], jnp.asarray(slot_sets[i], jnp.int32)) for i in range(ROT)]
        harness = device_kernel_seconds(_identity, (a, b), idx_rot)
        harness_busy = None if harness is None else harness["busy"]
        for label, fn in (
            ("gather_einsum", gather_einsum),
            ("one_hot", one_hot_einsum),
            ("ragged_dot", ragged),
        ):
            row[f"{label}_us"] = chained_seconds(fn, (a, b), idx_rot) * 1e6
            row[f"{label}_device_us"] = _device_us(fn, (a, b), idx_rot, harness_busy)
    row["kernel_x_floor"] = row["kernel_us"] / row["floor_us"]
    return row


def fused_sweep(tuned: LoraTunables, bw, rng) -> tuple[list[dict], LoraTunables]:
    """Shrink and expand in one launch (bgmv_fused) against the two launches, by batch size (chained
    harness): the largest size where the best fused shape wins becomes fused_max_tokens."""
    rows, fused_max, fused_best = [], 0, None
    for n in FUSED_TOKENS:
        tiers = ((1 << 30, tuned),)
        two = run_case("two launches", n, [16] * n, bw, rng, tiers, peers=False, check=False)
        best_n = None
        for chunk, out_units in itertools.product((8, 32), (4, 8, 16, 32)):
            t = dataclasses.replace(
                tuned, fused_max_tokens=1 << 30, fused_chunk_units=chunk, fused_out_units=out_units
            )
            r = run_case("fused", n, [16] * n, bw, rng, ((1 << 30, t),), peers=False, check=best_n is None)
            entry = {
                "tokens": n,
                **dataclasses.asdict(t),
                "kernel_us": r["kernel_us"],
                "two_launch_us": two["kernel_us"],
            }
            if "kernel_rel_err" in r:
                entry["kernel_rel_err"] = r["kernel_rel_err"]
            rows.append(entry)
            print("fused", entry, flush=True)
            if best_n is None or entry["kernel_us"] < best_n["kernel_us"]:
                best_n = entry
        if best_n["kernel_us"] >= two["kernel_us"]:
            break  # fused from the smallest batch up to the first size where two launches win
        fused_max = n
        if fused_best is None or n <= DECODE_BATCH:  # the shape that wins at decode-7b's batch
            fused_best = best_n
    if fused_best is not None:
        tuned = dataclasses.replace(
            tuned,
            fused_max_tokens=fused_max,
            fused_out_units=fused_best["fused_out_units"],
            fused_chunk_units=fused_best["fused_chunk_units"],
        )
    return rows, tuned


def _tune(args, bw, rng):
    """Launch shapes by batch: T5's 256 tokens (bandwidth) and decode-7b's layer at 32 (latency)."""
    pool, rotations, _ = _pool_case(256, [16] * 256, rng)
    large, large_rows = sweep_launch_shapes(
        lambda t: _kernel_op(t, 16), pool, rotations, LoraTunables(block_tokens=32), "256 tokens"
    )
    layer_for, pool, rotations = _decode_layer_case(DECODE_BATCH, rng)
    small, small_rows = sweep_launch_shapes(layer_for, pool, rotations, large, f"decode layer {DECODE_BATCH}")
    del pool, rotations
    fused_rows = []
    if args.fused:
        fused_rows, small = fused_sweep(small, bw, rng)
    tiers = ((2 * DECODE_BATCH, small), (1 << 30, large))
    return tiers, large, large_rows, small_rows, fused_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="the two headline cases only")
    ap.add_argument("--fused", action="store_true", help="also sweep the one-launch kernel (bgmv_fused)")
    ap.add_argument("--no-sweep", action="store_true", help="time the tuned tiers (shapes.TUNED) as they are")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bw = bandwidth()
    if args.no_sweep:
        tiers = shapes.TUNED[DH]
        large, large_rows, small_rows, fused_rows = tiers[-1][1], [], [], []
    else:
        tiers, large, large_rows, small_rows, fused_rows = _tune(args, bw, rng)
    # the two expands at decode-7b's layer, the small tier otherwise as tuned
    layer_for, pool, rotations = _decode_layer_case(DECODE_BATCH, rng)
    layer_expand = {}
    for backend in ("triton", "mosaic"):
        t = dataclasses.replace(tiers[0][1], expand_backend=backend)
        try:
            times = device_kernel_seconds(layer_for(t), (pool,), rotations)
            layer_expand[backend] = None if times is None else _kernel_split(times)[1] * 1e6
        except Exception as e:
            layer_expand[backend] = repr(e)[:300]
    print("decode layer expand us by backend", layer_expand, flush=True)
    del pool, rotations
    cases = [
        ("T5 256 tok / 256 slots r16", 256, [16] * 256),
        ("32 tok / 32 slots r16", 32, [16] * 32),
        ("256 tok / 1024 slots r16", 256, [16] * 1024),
        ("128 tok / 1024 slots r16", 128, [16] * 1024),
        ("256 tok / 256 slots mixed r{8,16,32,64}", 256, list(rng.choice([8, 16, 32, 64], 256))),
        ("256 tok / 256 slots r64", 256, [64] * 256),
    ]
    rows = []
    for name, n, ranks in cases[: 2 if args.quick else None]:
        row = run_case(name, n, [int(r) for r in ranks], bw, rng, tiers)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "bandwidth": bw,
        "tuned": dataclasses.asdict(large),
        "tuned_tiers": [[n, dataclasses.asdict(t)] for n, t in tiers],
        "sweep_256_tokens": large_rows,
        "sweep_decode_layer": small_rows,  # a layer's q/k/v group + o at the decode batch
        "decode_layer_expand_us": layer_expand,  # that layer's expands, Triton and Mosaic GPU
        "fused_sweep": fused_rows,
        "cases": rows,
        "shape": {"h_in": H, "h_out": H, "head_dim": DH, "dtype": "bfloat16"},
        "timing": "kernel_us and the peers' *_us: whole calls chained in one jit (harness kernels included); "
        "*_device_us: from a profiler trace, the BGMV kernels alone, the peers less the harness's kernels",
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("wrote", write_result("kernels-lora", result))
    print(
        f"{'case':42s} {'floor':>7s} {'kernel':>7s} {'device':>7s} {'gather':>7s} {'onehot':>7s} {'ragged':>8s}"
    )
    for r in rows:
        print(
            f"{r['case']:42s} {r['floor_us']:7.1f} {r['kernel_us']:7.1f} {r.get('kernel_device_us') or 0:7.1f} "
            f"{r.get('gather_einsum_device_us') or 0:7.1f} {r.get('one_hot_device_us') or 0:7.1f} "
            f"{r.get('ragged_dot_device_us') or 0:8.1f}"
        )


if __name__ == "__main__":
    main()
