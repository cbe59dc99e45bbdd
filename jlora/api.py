"""The Python generate API: Engine.from_pretrained, generate, chat, adapters."""

from __future__ import annotations

import dataclasses
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from checkpoints.peft import PeftFormatError, load_peft_adapter
from jlora import loader
from jlora.config import EngineConfig, MeshConfig
from jlora.engine import PagedEngine
from jlora.errors import AdapterInUseError, AdapterLoadError, AdapterNotFoundError, InvalidRequestError
from jlora.generate import ReferenceGenerator, SequenceState
from jlora.pool.adapters import AdapterPool
from jlora.request import RequestOutput, SamplingParams, validate_prompt_ids
from jlora.runner import Runner
from jlora.scheduler import SchedulerConfig
from jlora.sharding import make_mesh

Prompt = str | Sequence[int]


@dataclasses.dataclass
class StreamChunk:
    token_id: int | None
    text: str  # the new text since the previous chunk
    logprob: float | None
    finish_reason: str | None


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or ".." in name:
        raise InvalidRequestError(
            f"bad adapter name {name!r}: use letters, digits, '_', '-', '.' (no path separators, no '..')"
        )
    return name


class Engine:
    """One base model plus any number of LoRA adapters, served together in mixed batches."""

    def __init__(
        self,
        model: loader.LoadedModel,
        engine_config: EngineConfig | None = None,
        *,
        max_model_len: int | None = None,
        reference: bool = False,
        scheduler_config: SchedulerConfig | None = None,
        mesh: Mesh | MeshConfig | None = None,
    ):
        """reference=True runs the contiguous-cache reference path (the oracle); the default is the
        paged engine: one device pool for KV and adapters, continuous batching, AOT-compiled buckets.
        mesh: tensor parallelism over a jax.sharding.Mesh (or a MeshConfig over the visible devices)."""
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        engine_config = engine_config or EngineConfig()
        limit = min(max_model_len or engine_config.max_model_len, self.config.max_position_embeddings)
        self.max_model_len = limit
        self.engine_config = dataclasses.replace(engine_config, max_model_len=limit)
        self.reference = reference
        self._adapter_info: dict[str, dict[str, Any]] = {}
        self._in_use: dict[str, int] = {}
        self._lock = threading.RLock()  # one caller drives the engine at a time
        if reference:
            self._generator = ReferenceGenerator(self.config, self.tokenizer)
            self._adapters = AdapterPool(self.config, model.params["embed"].dtype)
        else:
            if isinstance(mesh, MeshConfig):
                mesh = make_mesh(mesh)
            self.paged = PagedEngine(self.config, model.params, self.engine_config, mesh=mesh)
            sched = scheduler_config or SchedulerConfig(
                max_batch=self.engine_config.max_batch,
                max_prefill_tokens=self.engine_config.max_prefill_tokens,
                max_chunk=self.engine_config.max_prefill_tokens,
                max_prefill_seqs=max(self.engine_config.prefill_batch_buckets),
                max_model_len=limit,
            )
            if (
                sched.max_chunk > self.engine_config.max_prefill_tokens
                or sched.max_batch > self.engine_config.max_batch
            ):
                raise ValueError("scheduler_config: max_chunk and max_batch must fit the engine's buckets")
            self.runner = Runner(self.paged, self.tokenizer, sched, overlap=self.engine_config.overlap)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = loader.DEFAULT_MODEL,
        dtype: str = "float32",
        *,
        max_model_len: int | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> Engine:
        """A model by name ('smollm2-135m') or path: a .gguf file, an HF folder, or an orbax folder.
        mesh= (a Mesh or MeshConfig) loads the weights straight into their shards."""
        mesh = kwargs.pop("mesh", None)
        if isinstance(mesh, MeshConfig):
            mesh = make_mesh(mesh)
        model = loader.load(name_or_path, dtype, progress=progress, mesh=mesh)
        return cls(model, max_model_len=max_model_len, mesh=mesh, **kwargs)

    def compile_count(self) -> int:
        return 0 if self.reference else len(self.paged.compiled)

    def save_checkpoint(self, folder: str) -> None:
        """Save converted params (orbax), config and tokenizer: from_pretrained(folder) skips conversion."""
        loader.save_checkpoint(self.model, folder)

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA folder under `name`. A bad folder raises AdapterLoadError and changes nothing."""
        check_adapter_name(name)
        self._refuse_loaded(name)  # before reading and laying it out; again under the lock (a race)
        try:
            adapter = load_peft_adapter(
                path, num_layers=self.config.num_hidden_layers, module_shapes=self.config.module_shapes()
            )
        except PeftFormatError as e:
            raise AdapterLoadError(str(e)) from e
        ranks = {m: adapter.module_rank(m) for m in self.config.module_shapes() if adapter.module_rank(m)}
        if not self.reference:
            ec = self.engine_config
            outside = sorted(set(ranks) - set(ec.lora_modules))
            if outside:
                raise AdapterLoadError(
                    f"adapter targets {outside}; this engine serves LoRA on {list(ec.lora_modules)}"
                )
            if max(ranks.values()) > ec.max_lora_rank:
                raise AdapterLoadError(
                    f"adapter rank {max(ranks.values())} exceeds the engine's max {ec.max_lora_rank}"
                )
            if self.paged.memory.adapter_pages_needed(ranks) > ec.num_pages - 1 - ec.pages_per_sequence():
                raise AdapterLoadError(
                    "adapter is too large for the device pool (it must fit beside one sequence)"
                )
        # laid out as device pages before taking the lock: serving goes on meanwhile, and loads from
        # several threads overlap (numpy and the file reads release the GIL)
        pages = None if self.reference else self.paged.adapter_pages(adapter, ranks)
        with self._lock:
            self._refuse_loaded(name)
            if self.reference:
                self._adapters.add(name, adapter)
            else:
                self.runner.add_adapter(name, pages, ranks)
            self._adapter_info[name] = {"path": str(path), "ranks": ranks, "bytes": adapter.nbytes}

    def _refuse_loaded(self, name: str) -> None:
        if name in self._adapter_info:
            raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first")

    def unload_adapter(self, name: str, wait: bool = True) -> None:
        """Unload an adapter. With wait=True a running batch that uses it finishes first; with
        wait=False an adapter in use raises AdapterInUseError."""
        if not wait and self._users(name):
            raise AdapterInUseError(f"adapter {name!r} is in use by a running request")
        while True:
            with self._lock:
                if name not in self._adapter_info:
                    raise AdapterNotFoundError(f"unknown adapter {name!r}")
                if not self._users(name):
                    if self.reference:
                        self._adapters.remove(name)
                    else:
                        self.runner.remove_adapter(name)
                    del self._adapter_info[name]
                    return
                if not wait:
                    raise AdapterInUseError(f"adapter {name!r} is in use by a running request")
            time.sleep(0.005)  # requests driven by another thread (AsyncEngine) finish first

    def _users(self, name: str) -> int:
        return self._in_use.get(name, 0) + (0 if self.reference else self.runner.adapter_users(name))

    def list_adapters(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._adapter_info.items()}

    # ---- generation -----------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("empty prompt")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give token-id prompts")
            ids = self.tokenizer.encode(prompt)
        elif (isinstance(prompt, Sequence) and not isinstance(prompt, bytes)) or (
            isinstance(prompt, np.ndarray) and prompt.ndim == 1
        ):
            ids = list(prompt)
        else:
            raise InvalidRequestError(
                f"a prompt is a string or a list of token ids, got {type(prompt).__name__}"
            )
        return validate_prompt_ids(ids, self.config.vocab_size)

    def _stop_ids(self, p: SamplingParams) -> frozenset[int]:
        ids = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            ids.update(self.config.eos_token_ids)
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def _prepare(self, prompt: Prompt, p: SamplingParams, adapter: str | None) -> SequenceState:
        if not isinstance(p, SamplingParams):
            raise InvalidRequestError("params must be a jlora.SamplingParams")
        p.validate(self.config.vocab_size)
        if p.temperature > 0 and not self.reference and self.engine_config.greedy_only:
            raise InvalidRequestError(
                "this engine serves greedy decoding only (greedy_only): temperature must be 0"
            )
        ids = self._prompt_ids(prompt)
        if len(ids) + p.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the context length {self.max_model_len}"
            )
        if adapter is not None:
            check_adapter_name(adapter)
            if adapter not in self._adapter_info:
                raise AdapterNotFoundError(
                    f"unknown adapter {adapter!r}; loaded: {sorted(self._adapter_info)}"
                )
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        rows = dict(self._adapters.rows[adapter]) if adapter is not None and self.reference else {}
        return SequenceState(prompt=ids, params=p, seed=seed, stop_ids=self._stop_ids(p), lora_rows=rows)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of prompts; each prompt may name its own adapter (or None for base)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if not prompts:
            raise InvalidRequestError("no prompts")
        n = len(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        adapter_list = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(params_list) != n or len(adapter_list) != n:
            raise InvalidRequestError(f"{n} prompts need {n} params and {n} adapters (or one for all)")
        with self._lock:
            seqs = [self._prepare(pr, pa, ad) for pr, pa, ad in zip(prompts, params_list, adapter_list)]
            used = [a for a in adapter_list if a is not None]
            for a in used:
                self._in_use[a] = self._in_use.get(a, 0) + 1
            try:
                if self.reference:
                    self._generator.run(self.model.params, seqs, self._adapters.weights)
                else:
                    self._run_paged(seqs, adapter_list)
            finally:
                for a in used:
                    self._in_use[a] -= 1
        return [
            RequestOutput(
                text=s.text,
                token_ids=list(s.generated),
                logprobs=list(s.logprobs) if s.params.logprobs else None,
                finish_reason=s.finish_reason or "length",
                prompt_token_ids=s.prompt,
                adapter=a,
            )
            for s, a in zip(seqs, adapter_list)
        ]

    def _run_paged(self, seqs: list[SequenceState], adapters: list[str | None]) -> None:
        ids = [self.runner.add(s, a) for s, a in zip(seqs, adapters)]
        pending = set(ids)
        try:
            while pending:
                for event in self.runner.step():
                    if event.finish_reason is not None:
                        pending.discard(event.request_id)
        finally:
            for rid in pending:  # an error mid-way: free what this call still holds
                self.runner.cancel(rid)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None
    ) -> Iterator[StreamChunk]:
        """Yield tokens as they come (other requests in the engine progress too). Closing the
        generator early cancels the request and frees its pages."""
        if self.reference:
            raise InvalidRequestError("stream needs the paged engine")
        with self._lock:
            state = self._prepare(prompt, params or SamplingParams(), adapter)
            rid = self.runner.add(state, adapter)
        done, emitted = False, ""
        try:
            while not done:
                with self._lock:
                    events = [e for e in self.runner.step() if e.request_id == rid]
                for e in events:
                    done = e.finish_reason is not None
                    text = (
                        state.text
                        if done
                        else (self.tokenizer.decode(state.generated) if self.tokenizer else "")
                    )
                    delta, emitted = text[len(emitted) :], text
                    yield StreamChunk(e.token, delta, e.logprob, e.finish_reason)
        finally:
            if not done:
                with self._lock:
                    self.runner.cancel(rid)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        params: SamplingParams | None = None,
        adapters: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Chat: one conversation (a list of messages) or a batch of them, through the chat template."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer and no chat template")
        if not messages:
            raise InvalidRequestError("no messages")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
            for c in conversations
        ]  # type: ignore[arg-type]
        return self.generate(prompts, params, adapters)
