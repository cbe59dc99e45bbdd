"""What a caller asks for (SamplingParams) and gets back (RequestOutput), with validation."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from jlora.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """vLLM-style sampling settings. temperature 0 is greedy; top_k <= 0 and top_p 1 disable those."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def validate(self, vocab_size: int) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"bad sampling parameters: {msg}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if (
            not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= -1 (<= 0 disables), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not (0 < self.top_p <= 1):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not (0 <= self.seed < 2**63)):
            raise bad(f"seed must be a non-negative integer, got {self.seed!r}")
        for s in self.stop_strings():
            if not isinstance(s, str) or not s:
                raise bad(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids or ():
            if not isinstance(t, int) or not (0 <= t < vocab_size):
                raise bad(f"stop token id {t!r} is not in the vocabulary [0, {vocab_size})")


@dataclasses.dataclass
class RequestOutput:
    """One finished request."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # 'stop' (eos, stop token or stop string), 'length', 'abort'
    prompt_token_ids: list[int]
    adapter: str | None = None


def validate_prompt_ids(ids: list, vocab_size: int) -> list[int]:
    """The prompt as plain ints. Any integer type is accepted (Python or numpy); bools, floats and
    ids outside [0, vocab_size) are errors."""
    if not ids:
        raise InvalidRequestError("empty prompt")
    not_ints = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool | np.bool_)]
    if not_ints:
        raise InvalidRequestError(f"token ids must be integers, got {not_ints[:5]!r}")
    out = [int(t) for t in ids]
    bad = [t for t in out if not (0 <= t < vocab_size)]
    if bad:
        raise InvalidRequestError(f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")
    return out
