"""One decode layer's BGMV LoRA (q/k/v group + o) at slora-trace's n = 5 shape, run a few times per set
of LoraTunables fields, nothing timed: the launches for a hardware-counter profiler (ncu) to read, each
checked against the reference.

    ncu --clock-control none --kernel-name regex:bgmv python -m bench.kernels.lora_once \
        --tokens 17 --ranks 16,32,64,16,32 --fields '{};{"num_warps": 2}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from bench.kernels import lora as bench_lora
from bench.kernels.lora_trace_sweep import DH, shared_layer_case
from pallas_kernels.lora import shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=17)
    ap.add_argument("--ranks", default="16,32,64,16,32", help="the adapters' ranks")
    ap.add_argument("--fields", default="", help="';'-separated JSON LoraTunables fields over the engine's")
    ap.add_argument("--calls", type=int, default=1)
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    pool, rotations, bucket = shared_layer_case(args.tokens, ranks, np.random.default_rng(0))
    base = shapes.tunables_for(DH, args.tokens)
    want = np.asarray(bench_lora.decode_layer_op(base, bucket, "reference")(pool, *rotations[0]), np.float32)
    for part in args.fields.split(";"):
        t = dataclasses.replace(base, **(json.loads(part) if part.strip() else {}))
        op = jax.jit(bench_lora.decode_layer_op(t, bucket))
        for _ in range(args.calls):
            got = jax.block_until_ready(op(pool, *rotations[0]))
        err = float(np.abs(np.asarray(got, np.float32) - want).max())
        print(json.dumps({**dataclasses.asdict(t), "max_abs_err": err}), flush=True)


if __name__ == "__main__":
    main()
