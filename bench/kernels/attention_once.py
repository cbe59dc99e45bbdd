"""Paged decode attention run a few times per tunables at one shape, nothing timed: the launches for a
hardware-counter profiler (ncu) to read, one configuration after another, in the order given.

    ncu --clock-control none --kernel-name regex:paged_decode python -m bench.kernels.attention_once \
        --trace-rows 17 --batch 32 --context 1024 --tunables '{"split_keys": 0};{"split_keys": 256}'

Each configuration runs --calls times after its compile; its output is checked against the reference.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from bench.kernels.attention import _attend, _case, trace_lengths
from pallas_kernels.paged_attention import AttentionTunables
from pallas_kernels.paged_attention.kernel import tunables_for

HEADS = {"mha": (32, 32), "gqa": (32, 8)}


def parse_tunables(text: str) -> list[AttentionTunables]:
    """';'-separated JSON objects of AttentionTunables fields, each over the tuned (16, 128) shapes."""
    base = tunables_for(16, 128)
    if text.startswith("@"):  # a file of them
        with open(text[1:]) as f:
            text = f.read().strip()
    out = []
    for part in text.split(";"):
        fields = json.loads(part) if part.strip() else {}
        out.append(AttentionTunables(**{**base.__dict__, **fields}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--trace-rows", type=int, default=17, help="0: every row at --context - 1 keys")
    ap.add_argument("--heads", default="mha", choices=sorted(HEADS))
    ap.add_argument(
        "--tunables", default="", help="';'-separated JSON AttentionTunables fields, or @FILE of them"
    )
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1, help="pool layers (the last one is read): 9 passes 4 GB")
    ap.add_argument("--implementation", default="pallas", help="pallas (GPU) or interpret (a CPU check)")
    args = ap.parse_args()
    hq, hkv = HEADS[args.heads]
    lens = trace_lengths(args.trace_rows, args.batch) if args.trace_rows else None
    fixed, rotations, kv_bytes = _case(args.batch, args.context, hq, hkv, lens, args.layers)
    layer = args.layers - 1
    print(f"pool {fixed[0].nbytes / 2**30:.2f} GiB, layer {layer}", flush=True)
    want = _attend(*fixed, *rotations[0], layer=layer, implementation="reference").astype(jnp.float32)
    print(f"kv bytes {kv_bytes}", flush=True)
    for t in parse_tunables(args.tunables):
        for _ in range(args.calls):
            got = jax.block_until_ready(
                _attend(*fixed, *rotations[0], layer=layer, tunables=t, implementation=args.implementation)
            )
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
        print(json.dumps({**t.__dict__, "max_abs_err": err}), flush=True)


if __name__ == "__main__":
    main()
