"""The scheduler: pure host Python (no jax). It decides; the engine executes.

Queues (waiting, running), admission by memory (KV pages and adapter residency in one pool),
continuous batching (requests join between steps), chunked prefill (a long prompt is fed over several
steps while decodes go on), preemption by recompute when pages run out, adapters placed ahead of use
from the waiting queue, LRU eviction of adapters no running request holds, and early abort of
requests whose first-token deadline can no longer be met (S-LoRA's early abort).
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from jlora.pool.memory import OutOfPages, PoolManager


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class SchedRequest:
    request_id: int
    prompt: list[int]
    max_tokens: int
    adapter: str | None = None
    adapter_ranks: dict[str, int] | None = None  # needed to place the adapter
    arrival: float = 0.0
    deadline: float | None = None  # absolute time by which the first token is due
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated
    num_generated: int = 0
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)


@dataclasses.dataclass
class ScheduledChunk:
    request_id: int
    tokens: list[int]  # the tokens to feed this step
    start: int  # position of tokens[0]
    page_table: list[int]
    adapter: str | None
    sample: bool  # the chunk reaches the last known token: sample the next one
    num_generated: int  # tokens generated before this step (the sampling step index)


@dataclasses.dataclass
class Schedule:
    decodes: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    prefills: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    load_adapters: list[str] = dataclasses.field(default_factory=list)  # copy to the device before the step
    evicted_adapters: list[str] = dataclasses.field(default_factory=list)
    preempted: list[int] = dataclasses.field(default_factory=list)
    aborted: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decodes or self.prefills)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # running sequences decoding together
    max_prefill_tokens: int = 256  # prompt tokens fed per step, all sequences together
    max_chunk: int = 256  # prompt tokens of one sequence per step (the largest compiled chunk)
    max_prefill_seqs: int = 4
    prefetch_lookahead: int = 16  # waiting requests whose adapters may be placed ahead of use
    max_model_len: int = 2048


class Scheduler:
    def __init__(self, config: SchedulerConfig, memory: PoolManager):
        self.config = config
        self.memory = memory
        self.waiting: collections.deque[SchedRequest] = collections.deque()
        self.running: list[SchedRequest] = []
        self.requests: dict[int, SchedRequest] = {}
        self.prefill_seconds_per_token = 0.0  # measured by the engine (EMA)
        self.stats = collections.Counter()

    # ---- requests in and out ----------------------------------------------------------------------
    def add(self, request: SchedRequest) -> None:
        if len(request.prompt) + request.max_tokens > self.config.max_model_len:
            raise ValueError("request longer than max_model_len")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, req: SchedRequest) -> None:
        self.memory.free_kv(req.request_id)
        if req.adapter is not None and self.memory.is_resident(req.adapter):
            self.memory.release(req.adapter)

    def finish(self, request_id: int) -> None:
        """A request is done (stop, length, cancel or abort): its pages are free at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    cancel = finish

    def on_token(self, request_id: int, token: int, now: float | None = None) -> None:
        """A token was sampled for the request. `now=None`: the step is still in flight and `token` a
        placeholder, replaced by set_token once it is read back (the next step is scheduled meanwhile)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        req.tokens.append(token)
        req.num_generated += 1
        if now is not None and req.first_token_time is None:
            req.first_token_time = now

    def set_token(self, request_id: int, token: int, now: float) -> None:
        """The value of the request's last token, which on_token recorded as a placeholder."""
        req = self.requests.get(request_id)
        if req is None:
            return
        req.tokens[-1] = token
        if req.first_token_time is None:
            req.first_token_time = now

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            rate = seconds / tokens
            p = self.prefill_seconds_per_token
            self.prefill_seconds_per_token = rate if p == 0 else 0.8 * p + 0.2 * rate

    # ---- memory -----------------------------------------------------------------------------------
    def _free_pages(self, n: int, protect: set[str], schedule: Schedule) -> bool:
        """Evict idle adapters (LRU) until n pages are free; adapters in `protect` stay."""
        for name in self.memory.evictable():
            if self.memory.num_free >= n:
                break
            if name in protect:
                continue
            self.memory.evict(name)
            schedule.evicted_adapters.append(name)
            self.stats["adapter_evictions"] += 1
        return self.memory.num_free >= n

    def _preempt(self, victim: SchedRequest, schedule: Schedule) -> None:
        """Preemption by recompute: drop its cache; it re-enters the queue at the front."""
        self.running.remove(victim)
        self._release(victim)
        victim.num_computed = 0
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        schedule.preempted.append(victim.request_id)
        self.stats["preemptions"] += 1

    def _ensure_adapter(self, req: SchedRequest, protect: set[str], schedule: Schedule, evict: bool) -> bool:
        if req.adapter is None or self.memory.is_resident(req.adapter):
            return True
        need = self.memory.adapter_pages_needed(req.adapter_ranks or {})
        if self.memory.num_free < need and not (evict and self._free_pages(need, protect, schedule)):
            return False
        self.memory.place(req.adapter, req.adapter_ranks or {})
        schedule.load_adapters.append(req.adapter)
        self.stats["adapter_loads"] += 1
        return True

    # ---- the step ---------------------------------------------------------------------------------
    def schedule(self, now: float) -> Schedule:
        s = Schedule()
        cfg = self.config

        for req in list(self.waiting):  # early abort: the first token can no longer be on time
            if req.deadline is not None and req.num_generated == 0:
                pending = len(req.tokens) - req.num_computed
                if now + pending * self.prefill_seconds_per_token > req.deadline:
                    self.finish(req.request_id)
                    s.aborted.append((req.request_id, "deadline"))
                    self.stats["aborted"] += 1

        # decodes first: every running sequence with exactly one token to feed
        in_use = {r.adapter for r in self.running if r.adapter}
        for req in sorted(self.running, key=lambda r: r.arrival):
            if (
                req.status is not Status.RUNNING
                or len(req.tokens) - req.num_computed != 1
                or req.num_generated == 0
            ):
                continue
            if req.num_generated >= req.max_tokens:  # done; the runner ends it once the last token is read
                continue
            need = self.memory.kv_pages_needed(req.request_id, req.num_computed + 1)
            while need and self.memory.num_free < need and not self._free_pages(need, in_use, s):
                victims = [
                    r
                    for r in self.running
                    if r is not req and r.request_id not in {d.request_id for d in s.decodes}
                ]
                if not victims:
                    break
                self._preempt(max(victims, key=lambda r: r.arrival), s)
            if self.memory.num_free < need:
                self._preempt(req, s)
                continue
            self.memory.grow_kv(req.request_id, req.num_computed + 1)
            s.decodes.append(self._chunk(req, 1))

        # prefill: continue partly fed sequences, then admit new ones, within the chunk budget
        budget = cfg.max_prefill_tokens
        for req in sorted(self.running, key=lambda r: r.arrival):
            if budget <= 0 or len(s.prefills) >= cfg.max_prefill_seqs:
                break
            pending = len(req.tokens) - req.num_computed
            if req.status is not Status.RUNNING or any(d.request_id == req.request_id for d in s.decodes):
                continue
            if pending < 1 or (pending == 1 and req.num_generated > 0):
                continue
            n = min(pending, budget, cfg.max_chunk)
            try:
                self.memory.grow_kv(req.request_id, req.num_computed + n)
            except OutOfPages:
                continue
            s.prefills.append(self._chunk(req, n))
            budget -= n

        while self.waiting and budget > 0 and len(s.prefills) < cfg.max_prefill_seqs:
            req = self.waiting[0]
            if len(self.running) >= cfg.max_batch:
                break
            protect = {r.adapter for r in self.running if r.adapter}
            if req.adapter:
                protect.add(req.adapter)
            full = self.memory.pages_for_tokens(len(req.tokens) + 1)
            adapter_need = 0
            if req.adapter and not self.memory.is_resident(req.adapter):
                adapter_need = self.memory.adapter_pages_needed(req.adapter_ranks or {})
            if self.memory.num_free < full + adapter_need and not self._free_pages(
                full + adapter_need, protect, s
            ):
                break  # FIFO: wait for memory
            if not self._ensure_adapter(req, protect, s, evict=True):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            if req.adapter:
                self.memory.acquire(req.adapter)
            n = min(len(req.tokens) - req.num_computed, budget, cfg.max_chunk)
            self.memory.grow_kv(req.request_id, req.num_computed + n)
            s.prefills.append(self._chunk(req, n))
            budget -= n

        # adapters of requests still waiting: place them now so the copy overlaps this step
        reserve = len(self.running) + 1
        for req in list(self.waiting)[: cfg.prefetch_lookahead]:
            if req.adapter and not self.memory.is_resident(req.adapter):
                need = self.memory.adapter_pages_needed(req.adapter_ranks or {})
                if self.memory.num_free - need >= reserve + self.memory.pages_for_tokens(len(req.tokens) + 1):
                    self._ensure_adapter(req, set(), s, evict=False)
        # placed and evicted within one step: nothing to copy
        s.load_adapters = [n for n in s.load_adapters if self.memory.is_resident(n)]
        return s

    def _chunk(self, req: SchedRequest, n: int) -> ScheduledChunk:
        start = req.num_computed
        req.num_computed += n
        if req.adapter:
            self.memory.touch(req.adapter)
        return ScheduledChunk(
            request_id=req.request_id,
            tokens=req.tokens[start : start + n],
            start=start,
            page_table=list(self.memory.page_tables[req.request_id]),
            adapter=req.adapter,
            sample=req.num_computed == len(req.tokens),
            num_generated=req.num_generated,
        )
