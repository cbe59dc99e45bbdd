"""Several processes, one engine: jax.distributed joins them into one mesh; process 0 runs the
scheduler and every other process follows its schedule.

Every compiled step and pool write is a collective over all processes' devices, so all processes
must issue the same calls in the same order. The leader broadcasts each call before making it (a
fixed-size header, then its payload: a step's packed metadata, or an adapter's page block); the
followers receive and repeat it. Start the same program in every process:

    jlora.multihost.initialize("10.0.0.1:9876", num_processes=2, process_id=i)
    engine = jlora.Engine.from_pretrained(path, mesh=MeshConfig(model=len(jax.devices())))
    if jax.process_index() == 0: ... serve or generate ..., then jlora.multihost.stop(engine.paged)
    else: jlora.multihost.follow(engine.paged)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

STOP, STEP, WRITE = 0, 1, 2


def initialize(
    coordinator: str, num_processes: int, process_id: int, local_device_ids: list[int] | None = None
) -> None:
    """Join the processes (collectives between CPU devices go over gloo; GPUs use NCCL)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator, num_processes=num_processes, process_id=process_id, local_device_ids=local_device_ids
    )


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def _broadcast(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def announce(kind: int, index: int, payload: np.ndarray) -> None:
    """Leader: tell the followers which call comes next, then send its payload."""
    _broadcast(np.array([kind, index, payload.size], np.int32))
    _broadcast(payload)


def to_global(x: np.ndarray, sharding: Any) -> jax.Array:
    """A host array that every process holds whole, as a global array with `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def follow(engine: Any) -> None:
    """Follower: repeat the leader's calls until it says stop."""
    names = engine.bucket_names
    while True:
        kind, index, size = (int(v) for v in _broadcast(np.zeros(3, np.int32)))
        if kind == STOP:
            return
        if kind == STEP:
            packed = _broadcast(np.zeros(size, np.int32))
            engine.run_compiled(names[index], packed)
        elif kind == WRITE:
            ids_and_block = _broadcast(np.zeros(size, np.float32))
            engine.write_block(*engine.split_write_payload(ids_and_block))
        else:
            raise RuntimeError(f"unknown command {kind} from the leader")


def stop(engine: Any) -> None:
    """Leader: release the followers."""
    if is_multiprocess() and jax.process_index() == 0:
        _broadcast(np.array([STOP, 0, 0], np.int32))
