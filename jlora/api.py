"""The Python generate API: Engine.from_pretrained, generate, chat, adapters."""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Sequence
from typing import Any

from checkpoints.peft import PeftFormatError, load_peft_adapter
from jlora import loader
from jlora.errors import AdapterInUseError, AdapterLoadError, AdapterNotFoundError, InvalidRequestError
from jlora.generate import ReferenceGenerator, SequenceState
from jlora.pool.adapters import AdapterPool
from jlora.request import RequestOutput, SamplingParams, validate_prompt_ids

Prompt = str | Sequence[int]
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or ".." in name:
        raise InvalidRequestError(
            f"bad adapter name {name!r}: use letters, digits, '_', '-', '.' (no path separators, no '..')"
        )
    return name


class Engine:
    """One base model plus any number of LoRA adapters, served together in mixed batches."""

    def __init__(self, model: loader.LoadedModel, max_model_len: int | None = None, lora_impl: str = "reference"):
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self._generator = ReferenceGenerator(self.config, self.tokenizer, lora_impl)
        self._adapters = AdapterPool(self.config, model.params["embed"].dtype)
        self._adapter_info: dict[str, dict[str, Any]] = {}
        self._in_use: dict[str, int] = {}
        self._lock = threading.RLock()  # one batch at a time; adapter changes wait for it

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = loader.DEFAULT_MODEL, dtype: str = "float32", *, max_model_len: int | None = None,
        progress: bool = True, **kwargs: Any,
    ) -> Engine:
        """A model by name ('smollm2-135m') or path: a .gguf file, an HF folder, or an orbax folder."""
        return cls(loader.load(name_or_path, dtype, progress=progress), max_model_len=max_model_len, **kwargs)

    def save_checkpoint(self, folder: str) -> None:
        """Save converted params (orbax), config and tokenizer: from_pretrained(folder) skips conversion."""
        loader.save_checkpoint(self.model, folder)

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA folder under `name`. A bad folder raises AdapterLoadError and changes nothing."""
        check_adapter_name(name)
        try:
            adapter = load_peft_adapter(
                path, num_layers=self.config.num_hidden_layers, module_shapes=self.config.module_shapes()
            )
        except PeftFormatError as e:
            raise AdapterLoadError(str(e)) from e
        with self._lock:
            if name in self._adapter_info:
                raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first")
            self._adapters.add(name, adapter)
            ranks = {m: adapter.module_rank(m) for m in self._adapters.shapes if adapter.module_rank(m)}
            self._adapter_info[name] = {"path": str(path), "ranks": ranks, "bytes": adapter.nbytes}

    def unload_adapter(self, name: str, wait: bool = True) -> None:
        """Unload an adapter. With wait=True a running batch that uses it finishes first; with
        wait=False an adapter in use raises AdapterInUseError."""
        if not wait and self._in_use.get(name):
            raise AdapterInUseError(f"adapter {name!r} is in use by a running request")
        with self._lock:
            if name not in self._adapter_info:
                raise AdapterNotFoundError(f"unknown adapter {name!r}")
            self._adapters.remove(name)
            del self._adapter_info[name]

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
        elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
            ids = list(prompt)
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        validate_prompt_ids(ids, self.config.vocab_size)
        return ids

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
        ids = self._prompt_ids(prompt)
        if len(ids) + p.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the context length {self.max_model_len}"
            )
        if adapter is not None:
            check_adapter_name(adapter)
            if adapter not in self._adapter_info:
                raise AdapterNotFoundError(f"unknown adapter {adapter!r}; loaded: {sorted(self._adapter_info)}")
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        rows = dict(self._adapters.rows[adapter]) if adapter is not None else {}
        return SequenceState(prompt=ids, params=p, seed=seed, stop_ids=self._stop_ids(p), lora_rows=rows)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of prompts; each prompt may name its own adapter (or None for base)."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
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
                self._generator.run(self.model.params, seqs, self._adapters.weights)
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
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, adapters)
