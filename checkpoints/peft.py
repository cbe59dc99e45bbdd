"""PEFT LoRA adapter folders: adapter_config.json + adapter_model.safetensors, validated whole.

Everything is checked before anything is returned: a folder that fails any check loads nothing.
Pickle files are never opened.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

KNOWN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {
    m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in KNOWN_MODULES
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class PeftFormatError(ValueError):
    """The folder is not a PEFT LoRA adapter jlora can serve; the message says why."""


@dataclasses.dataclass
class LoraLayer:
    a: np.ndarray  # [r, H_in]  (PEFT's lora_A.weight)
    b: np.ndarray  # [H_out, r] (PEFT's lora_B.weight)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass
class PeftAdapter:
    path: str
    config: dict[str, Any]
    layers: dict[tuple[int, str], LoraLayer]  # (layer index, module) -> weights

    def module_rank(self, module: str) -> int:
        """Rows this adapter needs for a module: its largest rank over the layers (0 if untargeted)."""
        return max((w.rank for (_, m), w in self.layers.items() if m == module), default=0)

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.layers.values())


def module_key(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module key."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def _targets(cfg: dict[str, Any], num_layers: int) -> set[tuple[int, str]]:
    target = cfg.get("target_modules")
    if target is None:
        raise PeftFormatError("adapter_config.json has no target_modules")
    layers_to_transform = cfg.get("layers_to_transform")
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    keys = {(i, m): module_key(i, m) for i in range(num_layers) for m in KNOWN_MODULES}
    if isinstance(target, str):
        try:
            regex = re.compile(target)
        except re.error as e:
            raise PeftFormatError(f"target_modules is not a valid regex: {e}") from e
        return {k for k, name in keys.items() if regex.fullmatch(name)}
    if not isinstance(target, list) or not all(isinstance(t, str) for t in target):
        raise PeftFormatError(f"target_modules must be a list of names or a regex string, got {target!r}")
    unknown = [t for t in target if t.rsplit(".", 1)[-1] not in KNOWN_MODULES]
    if unknown:
        raise PeftFormatError(f"unknown target modules {unknown}; jlora adapts {list(KNOWN_MODULES)}")
    found = {k for k, name in keys.items() if name in target or any(name.endswith("." + t) for t in target)}
    if layers_to_transform:
        found = {(i, m) for (i, m) in found if i in layers_to_transform}
    return found


def _check_config(cfg: dict[str, Any]) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise PeftFormatError("DoRA adapters (use_dora) are not supported")
    if cfg.get("modules_to_save"):
        raise PeftFormatError(
            f"modules_to_save {cfg['modules_to_save']} is not supported (full weights, not LoRA)"
        )
    if cfg.get("target_parameters"):
        raise PeftFormatError("target_parameters is not supported")
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise PeftFormatError(f"rank must be a positive integer, got {r!r}")
    for a in [cfg.get("lora_alpha", 8)] + list((cfg.get("alpha_pattern") or {}).values()):
        if not isinstance(a, int | float) or isinstance(a, bool) or not math.isfinite(a):
            raise PeftFormatError(f"lora_alpha must be a finite number, got {a!r}")


def load_peft_adapter(
    folder: str | os.PathLike[str],
    *,
    num_layers: int,
    module_shapes: dict[str, tuple[int, int]],  # module -> (H_in, H_out) of the base model
) -> PeftAdapter:
    """Read and validate a PEFT LoRA folder against the base model's geometry."""
    from safetensors import SafetensorError, safe_open

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise PeftFormatError(f"{folder}: not a folder")
    names = os.listdir(folder)
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise PeftFormatError(
            f"{folder}: pickle files {pickles} are refused (never unpickled); use safetensors"
        )
    if CONFIG_FILE not in names:
        raise PeftFormatError(f"{folder}: no {CONFIG_FILE}")
    if WEIGHTS_FILE not in names:
        raise PeftFormatError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{folder}: unreadable {CONFIG_FILE}: {e}") from e
    if not isinstance(cfg, dict):
        raise PeftFormatError(f"{folder}: {CONFIG_FILE} is not a JSON object")
    _check_config(cfg)
    targets = _targets(cfg, num_layers)
    if not targets:
        raise PeftFormatError(f"{folder}: target_modules match no layer of this model")

    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(os.path.join(folder, WEIGHTS_FILE), framework="numpy") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PeftFormatError(f"{folder}: unreadable {WEIGHTS_FILE}: {e}") from e

    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _KEY.match(key)
        if not match or match.group(3) not in KNOWN_MODULES or _PARENT[match.group(3)] != match.group(2):
            raise PeftFormatError(f"{folder}: unexpected tensor {key}")
        layer, module = int(match.group(1)), match.group(3)
        if layer >= num_layers:
            raise PeftFormatError(
                f"{folder}: tensor {key} is for layer {layer}; the model has {num_layers} (another model?)"
            )
        if (layer, module) not in targets:
            raise PeftFormatError(f"{folder}: tensor {key} is not in the adapter's target modules")
        found.setdefault((layer, module), {})[match.group(4)] = array

    missing = sorted(targets - {k for k, v in found.items() if len(v) == 2})
    if missing:
        names = [f"{module_key(i, m)}.lora_{{A,B}}" for i, m in missing[:4]]
        raise PeftFormatError(f"{folder}: missing tensors for {len(missing)} modules, e.g. {names}")

    use_rslora = bool(cfg.get("use_rslora", False))
    layers: dict[tuple[int, str], LoraLayer] = {}
    for (layer, module), ab in sorted(found.items()):
        key = module_key(layer, module)
        rank = int(_pattern_value(cfg.get("rank_pattern") or {}, key, cfg["r"]))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, key, cfg.get("lora_alpha", 8)))
        h_in, h_out = module_shapes[module]
        a, b = ab["A"], ab["B"]
        if a.shape != (rank, h_in) or b.shape != (h_out, rank):
            raise PeftFormatError(
                f"{folder}: {key}: lora_A {a.shape} / lora_B {b.shape} do not fit this model "
                f"(expected ({rank}, {h_in}) / ({h_out}, {rank})): an adapter for another model or rank?"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise PeftFormatError(f"{folder}: {key} holds NaN or Inf values")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        layers[(layer, module)] = LoraLayer(a=a, b=b, scaling=scaling)
    return PeftAdapter(path=folder, config=cfg, layers=layers)


def write_random_peft_adapter(
    folder: str | os.PathLike[str],
    *,
    num_layers: int,
    module_shapes: dict[str, tuple[int, int]],
    rank: int,
    alpha: float,
    target_modules: list[str],
    seed: int,
    std: float = 0.02,
    use_rslora: bool = False,
) -> str:
    """Write a random LoRA adapter in the PEFT format (for demos and benchmarks; tests use peft itself)."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(num_layers):
        for m in target_modules:
            h_in, h_out = module_shapes[m]
            prefix = f"base_model.model.{module_key(layer, m)}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, h_in)) * std).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((h_out, rank)) * std).astype(np.float32)
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "bias": "none",
    }
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=1)
    return folder
