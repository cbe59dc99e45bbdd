"""Host -> device copy bandwidth for adapter pages: from pageable numpy memory (what a plain
device_put does) against from a pinned host buffer (memory_kind "pinned_host"), at the size of one
rank-64 q/k/v/o Llama-2-7B adapter (16 pages of 8.4 MB). T7 (a cold adapter adds at most one decode
step) rests on this copy.

python -m bench.host_copy [--mb 134]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=134.2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import jax

    from bench.common import write_result
    from bench.kernels.timing import best_wall_seconds

    device = jax.devices()[0]
    host = np.random.default_rng(0).integers(0, 1 << 15, int(args.mb * 1e6 / 2), dtype=np.int16)
    kinds = [m.kind for m in device.addressable_memories()]
    out: dict = {"bytes": host.nbytes, "memory_kinds": kinds}

    s = best_wall_seconds(lambda: jax.device_put(host, device), args.repeats)
    out["pageable_GBps"] = host.nbytes / s / 1e9
    if "pinned_host" in kinds:
        pinned_sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        pinned = jax.device_put(host, pinned_sharding)
        jax.block_until_ready(pinned)
        on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        s = best_wall_seconds(lambda: jax.device_put(pinned, on_device), args.repeats)
        out["pinned_GBps"] = host.nbytes / s / 1e9
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(host, pinned_sharding))
        out["numpy_to_pinned_GBps"] = host.nbytes / (time.perf_counter() - start) / 1e9
    print(out)
    print("wrote", write_result("host-copy", out))


if __name__ == "__main__":
    main()
