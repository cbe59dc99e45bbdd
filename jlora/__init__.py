"""jlora: one base LLM, thousands of LoRA adapters, in JAX."""

from jlora.api import Engine
from jlora.errors import (
    AdapterInUseError,
    AdapterLoadError,
    AdapterNotFoundError,
    InvalidRequestError,
    JloraError,
    ModelLoadError,
)
from jlora.request import RequestOutput, SamplingParams

__all__ = [
    "AdapterInUseError",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "Engine",
    "InvalidRequestError",
    "JloraError",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
