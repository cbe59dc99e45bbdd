"""Save and restore converted parameter trees with orbax-checkpoint, so a second start skips conversion.

A checkpoint folder holds `params/` (orbax) and `config.json` (the Hugging Face config of the model)
plus, when the source had one, `tokenizer.json` and `chat_template.jinja`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
MARKER_FILE = "jlora_orbax.json"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def save(
    path: str | os.PathLike[str],
    params: Any,
    hf_config: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write params (any pytree of arrays) and the model's config to a new folder."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=1)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    with open(os.path.join(path, MARKER_FILE), "w") as f:
        json.dump({"format": 1}, f)


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return json.load(f)


def metadata(path: str | os.PathLike[str]) -> Any:
    """The saved tree's leaves' shapes and dtypes (no data read)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(os.fspath(path)), PARAMS_DIR))
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def restore(path: str | os.PathLike[str], target: Any | None = None) -> Any:
    """The saved params. `target`: a pytree of jax.ShapeDtypeStruct (with .sharding) to restore
    straight into those dtypes and shardings; without it, arrays land on the default device."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    checkpointer = ocp.StandardCheckpointer()
    if target is None:
        tree = metadata(path)
        device = jax.devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    return checkpointer.restore(os.path.join(path, PARAMS_DIR), target)
