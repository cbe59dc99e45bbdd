"""The serving loop: requests in, scheduler decides, engine executes, tokens out. Single-threaded;
callers serialize access (the API's lock, or AsyncEngine's thread)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import numpy as np

from checkpoints.peft import PeftAdapter
from jlora.engine import PagedEngine, SamplingRow
from jlora.errors import AdapterInUseError, AdapterNotFoundError
from jlora.generate import SequenceState, seed_key
from jlora.scheduler import SchedRequest, Scheduler, SchedulerConfig
from jlora.tokenizer import JloraTokenizer


@dataclasses.dataclass
class TokenEvent:
    request_id: int
    token: int | None  # None when the request ended without a new token (abort, cancel)
    logprob: float | None
    finish_reason: str | None  # set on the request's last event


class HostAdapters:
    """Adapters in host RAM, already laid out as their device pages (engine dtype, every shard's
    slice), so paging one in is a copy and nothing else. Kept in least-recently-used order."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.items: collections.OrderedDict[str, tuple[np.ndarray, dict[str, int]]] = collections.OrderedDict()

    def add(self, name: str, pages: np.ndarray, ranks: dict[str, int]) -> None:
        self.items[name] = (pages, ranks)

    def get(self, name: str) -> tuple[np.ndarray, dict[str, int]]:
        self.items.move_to_end(name)
        return self.items[name]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p, _ in self.items.values())


class Runner:
    def __init__(self, engine: PagedEngine, tokenizer: JloraTokenizer | None, scheduler_config: SchedulerConfig):
        self.engine = engine
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(scheduler_config, engine.memory)
        self.adapters = HostAdapters(engine.config.host_adapter_bytes)
        self.states: dict[int, SequenceState] = {}
        self.adapter_of: dict[int, str | None] = {}
        self._sampling: dict[int, SamplingRow] = {}
        self._ids = itertools.count()
        self.steps = 0

    # ---- adapters -----------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: PeftAdapter, ranks: dict[str, int]) -> None:
        """Lay the adapter out as device pages now (off the serving path); the PEFT tensors are dropped."""
        self.adapters.add(name, self.engine.adapter_pages(adapter, ranks), ranks)

    def adapter_users(self, name: str) -> int:
        return sum(1 for a in self.adapter_of.values() if a == name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters.items:
            raise AdapterNotFoundError(f"unknown adapter {name!r}")
        if self.adapter_users(name):
            raise AdapterInUseError(f"adapter {name!r} is in use by {self.adapter_users(name)} requests")
        if self.engine.memory.is_resident(name):
            self.engine.memory.evict(name)
        del self.adapters.items[name]

    # ---- requests -----------------------------------------------------------------------------------
    def add(self, state: SequenceState, adapter: str | None, deadline: float | None = None) -> int:
        if adapter is not None and adapter not in self.adapters.items:
            raise AdapterNotFoundError(f"unknown adapter {adapter!r}")
        rid = next(self._ids)
        ranks = self.adapters.get(adapter)[1] if adapter else None
        self.scheduler.add(SchedRequest(
            request_id=rid, prompt=list(state.prompt), max_tokens=state.params.max_tokens, adapter=adapter,
            adapter_ranks=ranks, arrival=time.monotonic(), deadline=deadline,
        ))
        p = state.params
        self._sampling[rid] = SamplingRow(float(p.temperature), int(p.top_k), float(p.top_p), seed_key(state.seed))
        self.states[rid] = state
        self.adapter_of[rid] = adapter
        return rid

    def _end(self, rid: int) -> None:
        self.scheduler.finish(rid)
        self.adapter_of.pop(rid, None)
        self._sampling.pop(rid, None)

    def cancel(self, rid: int) -> TokenEvent | None:
        """Stop a request now; its pages are free when this returns."""
        state = self.states.pop(rid, None)
        if state is None:
            return None
        self._end(rid)
        state.finish_reason = state.finish_reason or "abort"
        self._finalize_text(state)
        return TokenEvent(rid, None, None, state.finish_reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _finalize_text(self, state: SequenceState) -> None:
        if self.tokenizer is not None and not state.text_final:
            state.text = self.tokenizer.decode(state.generated)

    def step(self) -> list[TokenEvent]:
        """One engine iteration for every running request."""
        now = time.monotonic()
        schedule = self.scheduler.schedule(now)
        events: list[TokenEvent] = []
        for rid, reason in schedule.aborted:
            state = self.states.pop(rid)
            state.finish_reason = reason
            self.adapter_of.pop(rid, None)
            self._sampling.pop(rid, None)
            self._finalize_text(state)
            events.append(TokenEvent(rid, None, None, reason))
        for name in schedule.load_adapters:
            self.engine.copy_adapter(name, self.adapters.get(name)[0])  # host pages -> their device pages
        if schedule.empty:
            return events
        start = time.perf_counter()
        results = self.engine.execute(schedule, self._sampling)
        if schedule.prefills and not schedule.decodes:
            self.scheduler.observe_prefill(sum(len(c.tokens) for c in schedule.prefills), time.perf_counter() - start)
        self.steps += 1
        now = time.monotonic()
        for rid, (token, logprob) in results.items():
            state = self.states[rid]
            state.append(token, logprob, self.tokenizer)
            self.scheduler.on_token(rid, token, now)
            if state.finish_reason is not None:
                self._end(rid)
                self._finalize_text(self.states.pop(rid))
            events.append(TokenEvent(rid, token, logprob, state.finish_reason))
        return events
