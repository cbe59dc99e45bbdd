"""Gathered LoRA shrink+expand at decode shapes (BENCH.md T5): the Pallas BGMV kernel reading the
unified pool, its pure-jnp reference, the XLA per-token gather einsum, the one-hot einsum over all
slots (sglang-jax, tpu-inference) and jax.lax.ragged_dot; bytes moved / time against the copy
bandwidth measured in the same run. One projection, h_in = h_out = 4096, bf16.

python -m bench.kernels.lora [--out FILE] [--quick]
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
from bench.kernels.timing import bandwidth, chained_seconds, roofline_TBps
from pallas_kernels.lora import LoraTunables, lora_decode, lora_decode_group

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


def decode_layer_us(n_tokens: int, tunables: LoraTunables, rng: np.random.Generator) -> float:
    """One decoder layer's LoRA at decode as the engine runs it on the GPU (fuse_lora): q, k and v in one
    lora_decode_group, o alone; every token its own rank-16 adapter (distinct ones per projection).
    Microseconds per layer, in the chained harness (which adds its own slicing and checksum kernels)."""
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

    def layer(pool, x, tok, a, b, off, tok_o, a_o, b_o, off_o):
        kw = dict(implementation=KERNEL_IMPL, tunables=tunables, max_rank=r)
        qkv = lora_decode_group(x, pool, jnp.int32(0), tok, a, b, off, (H, H, H), **kw)
        o = lora_decode(x, pool, jnp.int32(0), tok_o, a_o, b_o, H, off_o, **kw)
        return jnp.concatenate([qkv, o], axis=1)

    return chained_seconds(layer, (pool,), [split(rot) for rot in rotations]) * 1e6


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


def run_case(name, n_tokens, ranks, bw, rng, peers=True, tunables=None, check=True):
    pool, rotations, slot_sets = _pool_case(n_tokens, ranks, rng)
    used = [sum(ranks[s] for s in slots) for slots in slot_sets]
    adapter_bytes = float(np.mean(used)) * 2 * H * 2  # A and B rows of the active adapters
    floor_bytes = adapter_bytes + 2 * n_tokens * H * 2  # + x read + delta written
    floor_s = floor_bytes / (roofline_TBps(bw) * 1e12)

    def kernel(pool, x, tok, a, b, off, impl=KERNEL_IMPL):
        return lora_decode(
            x,
            pool,
            jnp.int32(0),
            tok,
            a,
            b,
            H,
            off,
            implementation=impl,
            tunables=tunables,
            max_rank=max(ranks),
        )

    row = {
        "case": name,
        "tokens": n_tokens,
        "slots": len(ranks),
        "active_rank_rows": float(np.mean(used)),
        "floor_us": floor_s * 1e6,
    }
    if check:  # correctness at the timed shape, against the reference
        got = kernel(pool, *rotations[0])
        want = kernel(pool, *rotations[0], impl="reference")
        err = float(
            jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
            / jnp.max(jnp.abs(want.astype(jnp.float32)))
        )
        row["kernel_rel_err"] = err
    row["kernel_us"] = chained_seconds(kernel, (pool,), rotations) * 1e6
    row["reference_us"] = (
        chained_seconds(lambda p, *r: kernel(p, *r, impl="reference"), (pool,), rotations) * 1e6
    )
    if peers:
        a, b = _dense(ranks)
        idx_rot = [(rotations[i][0], jnp.asarray(slot_sets[i], jnp.int32)) for i in range(ROT)]
        row["gather_einsum_us"] = chained_seconds(gather_einsum, (a, b), idx_rot) * 1e6
        row["one_hot_us"] = chained_seconds(one_hot_einsum, (a, b), idx_rot) * 1e6
        row["ragged_dot_us"] = chained_seconds(ragged, (a, b), idx_rot) * 1e6
    row["kernel_x_floor"] = row["kernel_us"] / row["floor_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bw = bandwidth()
    rows = []
    sweep = []
    for chunk, out_units, warps in itertools.product((8, 32), (1, 2, 4), (2, 4)):
        if args.quick and (chunk, warps) != (8, 2):
            continue
        t = LoraTunables(chunk_units=chunk, out_units=out_units, num_warps=warps)
        r = run_case("tune", 256, [16] * 256, bw, rng, peers=False, tunables=t, check=False)
        sweep.append({**dataclasses.asdict(t), "kernel_us": r["kernel_us"]})
        print("tune", dataclasses.asdict(t), f"{r['kernel_us']:.1f} us", flush=True)
    best = min(sweep, key=lambda s: s["kernel_us"])
    tuned = LoraTunables(**{k: v for k, v in best.items() if k != "kernel_us"})
    # shrink and expand in one launch (bgmv_fused) against the two launches, by batch size: the
    # largest size where the best fused shape wins becomes fused_max_tokens
    fused_sweep, fused_max, fused_best = [], 0, None
    for n in FUSED_TOKENS:
        two = run_case("two launches", n, [16] * n, bw, rng, peers=False, tunables=tuned, check=False)
        best_n = None
        for chunk, out_units in itertools.product((8, 32), (4, 8, 16, 32)):
            t = dataclasses.replace(
                tuned, fused_max_tokens=1 << 30, fused_chunk_units=chunk, fused_out_units=out_units
            )
            r = run_case("fused", n, [16] * n, bw, rng, peers=False, tunables=t, check=best_n is None)
            entry = {
                "tokens": n,
                **dataclasses.asdict(t),
                "kernel_us": r["kernel_us"],
                "two_launch_us": two["kernel_us"],
            }
            if "kernel_rel_err" in r:
                entry["kernel_rel_err"] = r["kernel_rel_err"]
            fused_sweep.append(entry)
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
    # decode-7b's shape (T3): a layer's q/k/v group and o at the decode batch, by launch shape
    layer_sweep = []
    for chunk, out_units, warps in itertools.product((8, 32), (1, 2, 4, 8), (2, 4)):
        if args.quick and out_units == 8:
            continue
        t = dataclasses.replace(tuned, chunk_units=chunk, out_units=out_units, num_warps=warps)
        layer_sweep.append({**dataclasses.asdict(t), "layer_us": decode_layer_us(DECODE_BATCH, t, rng)})
        print("decode layer", layer_sweep[-1], flush=True)
    cases = [
        ("T5 256 tok / 256 slots r16", 256, [16] * 256),
        ("32 tok / 32 slots r16", 32, [16] * 32),
        ("256 tok / 1024 slots r16", 256, [16] * 1024),
        ("128 tok / 1024 slots r16", 128, [16] * 1024),
        ("256 tok / 256 slots mixed r{8,16,32,64}", 256, list(rng.choice([8, 16, 32, 64], 256))),
        ("256 tok / 256 slots r64", 256, [64] * 256),
    ]
    for name, n, ranks in cases[: 2 if args.quick else None]:
        row = run_case(name, n, [int(r) for r in ranks], bw, rng, tunables=tuned)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "bandwidth": bw,
        "tuned": dataclasses.asdict(tuned),
        "sweep": sweep,
        "fused_sweep": fused_sweep,
        "decode_layer_sweep": layer_sweep,  # a layer's q/k/v + o LoRA at the decode batch
        "cases": rows,
        "shape": {"h_in": H, "h_out": H, "head_dim": DH, "dtype": "bfloat16"},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("wrote", write_result("kernels-lora", result))
    print(
        f"{'case':42s} {'floor':>7s} {'kernel':>7s} {'ref':>7s} {'gather':>7s} {'onehot':>7s} {'ragged':>8s}"
    )
    for r in rows:
        print(
            f"{r['case']:42s} {r['floor_us']:7.1f} {r['kernel_us']:7.1f} {r['reference_us']:7.1f} "
            f"{r.get('gather_einsum_us', 0):7.1f} {r.get('one_hot_us', 0):7.1f} {r.get('ragged_dot_us', 0):8.1f}"
        )


if __name__ == "__main__":
    main()
