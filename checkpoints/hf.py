"""Hugging Face model folders: config.json + model.safetensors (or a sharded index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no config.json")
    with open(path) as f:
        return json.load(f)


def safetensors_files(folder: str | os.PathLike[str]) -> list[str]:
    """The weight files of a folder: the sharded index's files, or model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(name.endswith(".bin") for name in os.listdir(folder)):
        raise ValueError(f"{folder}: only pickle (.bin) weights found; jlora reads safetensors only")
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def count_tensors(folder: str | os.PathLike[str]) -> int:
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(folder):
        with safe_open(path, framework="numpy") as f:
            total += len(list(f.keys()))
    return total


def tensors(folder: str | os.PathLike[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor, one at a time. bf16 is widened via torch-free bit casts."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                yield name, np.asarray(f.get_tensor(name), dtype=np.float32)
