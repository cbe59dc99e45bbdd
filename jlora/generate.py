"""The reference generation path: contiguous KV cache, whole batch prefilled then decoded together.

Shapes are bucketed (batch, prompt length, cache length, LoRA pairs) so a workload compiles a few
step functions, not one per request. The paged engine replaces this path for serving; it stays as
the oracle the paged engine is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.buckets import next_power_of_two
from jlora.config import ModelConfig
from jlora.metadata import ContiguousBatch
from jlora.model.llama import forward, init_cache
from jlora.model.lora import MODULES, LoraPairs, LoraWeights
from jlora.request import SamplingParams
from jlora.sampling import SamplingArrays, sample
from jlora.tokenizer import JloraTokenizer


@dataclasses.dataclass
class SequenceState:
    """Host-side state of one request while it runs."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    lora_rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # module -> pool rows
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    text_final: bool = False  # set when a stop string cut the text

    def append(self, token: int, logprob: float, tokenizer: JloraTokenizer | None) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        self.generated.append(token)
        self.logprobs.append(logprob)
        stops = self.params.stop_strings()
        if stops and tokenizer is not None:
            text = tokenizer.decode(self.generated)
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                self.text, self.finish_reason, self.text_final = text[: min(hits)], "stop", True
                return
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.params.max_tokens:
            self.finish_reason = "length"


def seed_key(seed: int) -> np.ndarray:
    """A raw threefry key [2] uint32 from a 64-bit seed (as jax.random.PRNGKey does)."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], dtype=np.uint32)


def build_pairs(
    rows_per_sequence: list[dict[str, np.ndarray]],
    tokens_per_sequence: list[np.ndarray],  # flat token indices of each sequence in this step
) -> dict[str, LoraPairs]:
    """(token, pool row) pairs for every module, padded to one power-of-two length K."""
    per_module: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m in MODULES:
        toks, rows = [], []
        for seq_rows, flat in zip(rows_per_sequence, tokens_per_sequence):
            r = seq_rows.get(m)
            if r is None or len(r) == 0 or len(flat) == 0:
                continue
            toks.append(np.repeat(flat, len(r)))
            rows.append(np.tile(r, len(flat)))
        t = np.concatenate(toks) if toks else np.zeros(0, np.int32)
        r = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        per_module[m] = (t, r)
    k = next_power_of_two(max(len(t) for t, _ in per_module.values()), minimum=16)
    out = {}
    for m, (t, r) in per_module.items():
        tok = np.zeros(k, np.int32)
        row = np.zeros(k, np.int32)
        tok[: len(t)], row[: len(r)] = t, r
        out[m] = LoraPairs(token_index=jnp.asarray(tok), row_index=jnp.asarray(row))
    return out


class ReferenceGenerator:
    """Runs batches of SequenceStates to completion on a contiguous cache."""

    def __init__(self, config: ModelConfig, tokenizer: JloraTokenizer | None, lora_impl: str = "reference"):
        self.config = config
        self.tokenizer = tokenizer
        self._step = jax.jit(
            functools.partial(self._step_fn, config=config, lora_impl=lora_impl), donate_argnums=(1,)
        )

    @staticmethod
    def _step_fn(params, cache, batch, logits_at, lora, sampling, step_index, *, config, lora_impl):
        cache, logits = forward(
            params, cache, batch, config=config, lora=lora, logits_at=logits_at, lora_impl=lora_impl
        )
        keys = jax.vmap(jax.random.fold_in)(sampling.keys, step_index)
        tokens, logprobs = sample(logits, sampling.replace(keys=keys))
        return cache, tokens, logprobs

    def run(
        self, params: dict[str, Any], seqs: list[SequenceState], lora_weights: dict[str, LoraWeights] | None
    ) -> None:
        """Generate until every sequence has finished; results are written into `seqs`."""
        n = len(seqs)
        b = next_power_of_two(n)
        t = next_power_of_two(max(len(s.prompt) for s in seqs), minimum=8)
        s_len = next_power_of_two(max(len(s.prompt) + s.params.max_tokens for s in seqs), minimum=64)
        s_len = max(s_len, t)
        cache = init_cache(self.config, b, s_len, params["embed"].dtype)
        use_lora = lora_weights is not None and any(s.lora_rows for s in seqs)

        sampling = SamplingArrays(
            temperature=jnp.asarray([s.params.temperature for s in seqs] + [0.0] * (b - n), jnp.float32),
            top_k=jnp.asarray([s.params.top_k for s in seqs] + [0] * (b - n), jnp.int32),
            top_p=jnp.asarray([float(s.params.top_p) for s in seqs] + [1.0] * (b - n), jnp.float32),
            keys=jnp.asarray(np.stack([seed_key(s.seed) for s in seqs] + [seed_key(0)] * (b - n))),
        )

        tokens = np.zeros((b, t), np.int32)
        positions = np.full((b, t), s_len, np.int32)
        logits_at = np.zeros(b, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt)] = s.prompt
            positions[i, : len(s.prompt)] = np.arange(len(s.prompt))
            logits_at[i] = len(s.prompt) - 1
        flat = [i * t + np.arange(len(s.prompt), dtype=np.int32) for i, s in enumerate(seqs)]
        step = 0
        while True:
            lora = None
            if use_lora:
                lora = (lora_weights, build_pairs([s.lora_rows for s in seqs], flat))
            batch = ContiguousBatch(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions))
            counters = jnp.full((b,), step, jnp.uint32)
            cache, new_tokens, new_logprobs = self._step(
                params, cache, batch, jnp.asarray(logits_at), lora, sampling, counters
            )
            new_tokens, new_logprobs = np.asarray(new_tokens), np.asarray(new_logprobs)
            for i, s in enumerate(seqs):
                if s.finish_reason is None:
                    s.append(int(new_tokens[i]), float(new_logprobs[i]), self.tokenizer)
            if all(s.finish_reason is not None for s in seqs):
                break
            step += 1
            tokens = np.zeros((b, 1), np.int32)
            positions = np.full((b, 1), s_len, np.int32)
            flat = []
            for i, s in enumerate(seqs):
                active = s.finish_reason is None
                tokens[i, 0] = s.generated[-1]
                positions[i, 0] = len(s.prompt) + len(s.generated) - 1 if active else s_len
                flat.append(np.array([i], np.int32) if active else np.zeros(0, np.int32))
            logits_at = np.zeros(b, np.int32)
        for s in seqs:
            if self.tokenizer is not None and not s.text_final:
                s.text = self.tokenizer.decode(s.generated)
