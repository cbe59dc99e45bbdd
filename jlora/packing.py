"""One host->device transfer per step: a step's metadata pytree packed into a single int32 array.

Every leaf is 4 bytes wide (int32, uint32, float32) and travels as its int32 bit pattern; inside the
compiled step `unpack` slices and bitcasts it back. The spec (tree structure, shapes, dtypes) is
static per bucket, so packing adds no recompilation and a step costs one transfer instead of ~30.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = ("int32", "uint32", "float32")


@dataclasses.dataclass(frozen=True)
class PackedSpec:
    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype name) of each leaf

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for shape, _ in self.leaves)


def spec_of(tree: Any) -> PackedSpec:
    """The spec of a pytree of arrays or ShapeDtypeStructs (4-byte dtypes only)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf in leaves:
        name = np.dtype(leaf.dtype).name
        if name not in _DTYPES:
            raise TypeError(f"cannot pack dtype {name}; expected one of {_DTYPES}")
        out.append((tuple(leaf.shape), name))
    return PackedSpec(treedef, tuple(out))


def pack(tree: Any, spec: PackedSpec) -> np.ndarray:
    """The tree's leaves (numpy) as one int32 vector, in spec order."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(spec.leaves):
        raise ValueError(f"tree has {len(leaves)} leaves, spec {len(spec.leaves)}")
    parts = []
    for leaf, (shape, name) in zip(leaves, spec.leaves):
        arr = np.asarray(leaf, dtype=name)
        if arr.shape != shape:
            raise ValueError(f"leaf shape {arr.shape} != spec {shape}")
        parts.append(arr.reshape(-1).view(np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def unpack(flat: jax.Array, spec: PackedSpec) -> Any:
    """Inverse of pack, traced: the tree of jnp arrays."""
    leaves, offset = [], 0
    for shape, name in spec.leaves:
        n = int(np.prod(shape))
        part = flat[offset : offset + n].reshape(shape)
        if name != "int32":
            part = jax.lax.bitcast_convert_type(part, jnp.dtype(name))
        leaves.append(part)
        offset += n
    return jax.tree.unflatten(spec.treedef, leaves)
