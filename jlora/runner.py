"""The serving loop: requests in, scheduler decides, engine executes, tokens out. Single-threaded;
callers serialize access (the API's lock, or AsyncEngine's thread)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import numpy as np

from jlora.engine import PENDING, InFlight, PagedEngine, SamplingRow
from jlora.errors import AdapterInUseError, AdapterNotFoundError
from jlora.generate import SequenceState, seed_key
from jlora.pool.device import PinnedPages
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
        self.items: collections.OrderedDict[str, tuple[np.ndarray, dict[str, int]]] = (
            collections.OrderedDict()
        )

    def add(self, name: str, pages: np.ndarray, ranks: dict[str, int]) -> None:
        self.items[name] = (pages, ranks)

    def get(self, name: str) -> tuple[np.ndarray, dict[str, int]]:
        self.items.move_to_end(name)
        return self.items[name]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p, _ in self.items.values())


class Runner:
    def __init__(
        self,
        engine: PagedEngine,
        tokenizer: JloraTokenizer | None,
        scheduler_config: SchedulerConfig,
        overlap: bool = True,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(scheduler_config, engine.memory)
        self.adapters = HostAdapters(engine.config.host_adapter_bytes)
        self.states: dict[int, SequenceState] = {}
        self.adapter_of: dict[int, str | None] = {}
        self._sampling: dict[int, SamplingRow] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.overlap = overlap  # schedule and pack step N+1 while step N runs (see step())
        self._inflight: InFlight | None = None
        self.phase_seconds: collections.Counter[str] = collections.Counter()

    # ---- adapters -----------------------------------------------------------------------------------
    def add_adapter(self, name: str, pages: np.ndarray | PinnedPages, ranks: dict[str, int]) -> None:
        """Register an adapter already laid out as its device pages (PagedEngine.adapter_pages, which
        callers run beforehand, outside any lock: off the serving path, several at once)."""
        self.adapters.add(name, pages, ranks)

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
        self.scheduler.add(
            SchedRequest(
                request_id=rid,
                prompt=list(state.prompt),
                max_tokens=state.params.max_tokens,
                adapter=adapter,
                adapter_ranks=ranks,
                arrival=time.monotonic(),
                deadline=deadline,
            )
        )
        p = state.params
        self._sampling[rid] = SamplingRow(
            float(p.temperature), int(p.top_k), float(p.top_p), seed_key(state.seed)
        )
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
        return self.scheduler.has_work() or self._inflight is not None

    def _finalize_text(self, state: SequenceState) -> None:
        if self.tokenizer is not None and not state.text_final:
            state.text = self.tokenizer.decode(state.generated)

    def step(self) -> list[TokenEvent]:
        """One engine iteration for every running request.

        With overlap (the default) the host works while the device computes: step N+1 is scheduled,
        packed and queued while step N still runs, then N's tokens are read back and processed. A token
        N samples and N+1 feeds (a decode's input) goes from N to N+1 on the device, through the token
        carry. Events therefore come one call after their step. A request that finishes at N has had
        one more step queued for it: that output is dropped. Without overlap each call runs its step to
        the end. `phase_seconds` accumulates the host time of each phase.
        """
        clock = time.perf_counter
        t0 = clock()
        schedule = self.scheduler.schedule(time.monotonic())
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
        t1 = clock()
        previous, self._inflight = self._inflight, None
        t2 = t1
        if not schedule.empty:
            sources = previous.sources if previous is not None else {}
            prepared = self.engine.prepare(schedule, self._sampling, sources)
            t2 = clock()
            self._inflight = self.engine.launch(prepared)
            self.steps += 1
        t3 = clock()
        results = self._collect(previous) if previous is not None else {}
        t4 = clock()
        events += self._consume(results)
        if self._inflight is not None:
            for rid in self._inflight.sample_requests:  # the token the queued step samples is pending
                if rid in self.states:
                    self.scheduler.on_token(rid, PENDING)
            if not self.overlap:
                current, self._inflight = self._inflight, None
                t = clock()
                results = self._collect(current)
                t4 += clock() - t
                events += self._consume(results)
        t5 = clock()
        for phase, seconds in (
            ("schedule", t1 - t0),
            ("prepare", t2 - t1),
            ("launch", t3 - t2),
            ("wait", t4 - t3),
            ("consume", t5 - t4),
        ):  # without overlap, wait includes the step's own collect
            self.phase_seconds[phase] += seconds
        return events

    def _collect(self, inflight: InFlight) -> dict[int, tuple[int, float]]:
        results = self.engine.collect(inflight)
        if all(call.kind != "decode" for call in inflight.calls):
            # a prompt advances only in steps that carry its chunks: the step's time over their tokens
            # (a mixed call's decode rows included) is what the scheduler's early abort must expect
            self.scheduler.observe_prefill(
                sum(c.prefill_tokens for c in inflight.calls), time.perf_counter() - inflight.launched_at
            )
        return results

    def _consume(self, results: dict[int, tuple[int, float]]) -> list[TokenEvent]:
        now = time.monotonic()
        events = []
        for rid, (token, logprob) in results.items():
            state = self.states.get(rid)
            if state is None:  # cancelled, or finished the step before (a dropped extra step)
                continue
            state.append(token, logprob, self.tokenizer)
            self.scheduler.set_token(rid, token, now)
            if state.finish_reason is not None:
                self._end(rid)
                self._finalize_text(self.states.pop(rid))
            events.append(TokenEvent(rid, token, logprob, state.finish_reason))
        return events
