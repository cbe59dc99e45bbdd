"""One decoder layer's prompt-chunk LoRA (SGMV) as a mixed step runs it: a chunk of --chunk tokens after
--decodes decode rows, q/k/v as one group and o alone, one adapter of --rank, the deltas added into the
step's rows in place. Run a few times per set of LoraTunables fields, nothing timed: the launches for a
hardware-counter profiler (ncu) to read.

    ncu --clock-control none --kernel-name regex:sgmv python -m bench.kernels.sgmv_once \
        --chunk 192 --rank 64 --fields '{};{"sgmv_shrink_columns": 64}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lora import lora_prefill_group_add, prefill_group_width
from pallas_kernels.lora.shapes import tunables_for

H, DH = 4096, 128
UNITS = H // DH


def chunk_case(decodes: int, chunk: int, rank: int, impl_dtype=jnp.bfloat16):
    """(pool, x, y_qkv, y_o, group starts, o starts): one adapter's q/k/v/o rows after the 8-unit zero
    page (each rank row an A row of UNITS units, then its B row), a_start/b_start [1, width]."""
    unit, starts = 8, []
    for _ in range(4):  # q, k, v, o
        a = [unit + j * 2 * UNITS for j in range(rank)]
        starts.append((a, [u + UNITS for u in a]))
        unit += rank * 2 * UNITS
    pool = (jax.random.normal(jax.random.PRNGKey(1), (1, unit, DH), jnp.float32) * 0.05).astype(impl_dtype)
    pool = pool.at[:, :8].set(0)
    width = prefill_group_width(3, rank)
    group = np.zeros((2, 1, width), np.int32)
    for m in range(3):
        group[0, 0, m * rank : (m + 1) * rank] = starts[m][0]
        group[1, 0, m * rank : (m + 1) * rank] = starts[m][1]
    o = np.asarray([[starts[3][0]], [starts[3][1]]], np.int32)  # [2, 1, rank]
    n = decodes + chunk
    x = jax.random.normal(jax.random.PRNGKey(2), (n, H), jnp.float32).astype(impl_dtype)
    y_qkv = jnp.zeros((n, 3 * H), impl_dtype)
    y_o = jnp.zeros((n, H), impl_dtype)
    return pool, x, y_qkv, y_o, jnp.asarray(group), jnp.asarray(o)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decodes", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=192)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--fields", default="", help="';'-separated JSON LoraTunables fields over the engine's")
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--implementation", default="pallas", help="pallas (GPU) or interpret (a CPU check)")
    args = ap.parse_args()
    pool, x, y_qkv, y_o, group, o = chunk_case(args.decodes, args.chunk, args.rank)
    base = tunables_for(DH, args.decodes + args.chunk)

    def run(t, implementation: str) -> np.ndarray:
        kw = dict(row_start=args.decodes, seq_len=args.chunk, implementation=implementation, tunables=t)

        @jax.jit
        def layer(pool, x, y_qkv, y_o):
            qkv = lora_prefill_group_add(
                y_qkv, x, pool, jnp.int32(0), group[0], group[1], (H, H, H), args.rank, **kw
            )
            out = lora_prefill_group_add(y_o, x, pool, jnp.int32(0), o[0], o[1], (H,), args.rank, **kw)
            return qkv, out

        for _ in range(args.calls):
            got = jax.block_until_ready(layer(pool, x, y_qkv, y_o))
        return np.concatenate([np.asarray(g, np.float32) for g in got], axis=1)

    want = run(base, "reference")
    for part in args.fields.split(";"):
        t = dataclasses.replace(base, **(json.loads(part) if part.strip() else {}))
        err = float(np.abs(run(t, args.implementation) - want).max())
        print(json.dumps({**dataclasses.asdict(t), "max_abs_err": err}), flush=True)


if __name__ == "__main__":
    main()
