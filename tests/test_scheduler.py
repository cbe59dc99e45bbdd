"""The scheduler alone (no jax), driven by a mock engine: admission, chunking, preemption, adapters,
deadlines, cancellation; and the pool accounting property over 1,000 random requests."""

from __future__ import annotations

import random

import pytest

from jlora.pool.layout import PoolLayout
from jlora.pool.memory import PoolManager
from jlora.scheduler import SchedRequest, Scheduler, SchedulerConfig

SHAPES = (
    ("q_proj", 64, 64),
    ("k_proj", 64, 32),
    ("v_proj", 64, 32),
    ("o_proj", 64, 64),
    ("gate_proj", 64, 128),
    ("up_proj", 64, 128),
    ("down_proj", 128, 64),
)


def make(num_pages=64, page_size=4, **cfg) -> Scheduler:
    layout = PoolLayout(
        num_layers=2,
        num_pages=num_pages,
        page_size=page_size,
        num_kv_heads=2,
        head_dim=16,
        module_shapes=SHAPES,
    )
    defaults = dict(max_batch=4, max_prefill_tokens=16, max_prefill_seqs=2, max_model_len=256, max_chunk=12)
    defaults.update(cfg)
    return Scheduler(SchedulerConfig(**defaults), PoolManager(layout))


class MockEngine:
    """Executes schedules by emitting random tokens; checks what a real engine would rely on."""

    def __init__(self, sched: Scheduler, rng: random.Random):
        self.sched, self.rng, self.now = sched, rng, 0.0
        self.done: dict[int, str] = {}

    def step(self) -> None:
        self.execute(self.sched.schedule(self.now))

    def execute(self, s) -> None:
        mem = self.sched.memory
        for rid, reason in s.aborted:
            self.done[rid] = reason
        for name in s.load_adapters:
            assert mem.is_resident(name)
        seen = set()
        for ch in s.decodes + s.prefills:
            assert ch.request_id not in seen  # a request appears once per step
            seen.add(ch.request_id)
            assert len(ch.page_table) * mem.layout.page_size >= ch.start + len(ch.tokens)  # room for its K/V
            assert 0 not in ch.page_table
            assert len(ch.tokens) <= self.sched.config.max_chunk
            if ch.adapter:
                assert mem.is_resident(ch.adapter) and mem.adapters[ch.adapter].refcount > 0
        self.now += 0.01
        for ch in s.decodes + s.prefills:
            if ch.sample:
                req = self.sched.requests[ch.request_id]
                self.sched.on_token(ch.request_id, self.rng.randrange(100), self.now)
                if req.num_generated >= req.max_tokens or self.rng.random() < 0.02:
                    self.sched.finish(ch.request_id)
                    self.done[ch.request_id] = "stop"
        mem.check_invariants()


def test_chunked_prefill_keeps_decodes_going():
    sched = make(max_prefill_tokens=8, max_chunk=8)
    eng = MockEngine(sched, random.Random(0))
    sched.add(SchedRequest(0, prompt=list(range(5)), max_tokens=50))
    eng.step()  # prefill of the short prompt
    sched.add(SchedRequest(1, prompt=list(range(40)), max_tokens=5))
    chunks = []
    for _ in range(5):
        s = sched.schedule(eng.now)
        assert [d.request_id for d in s.decodes] == [0]  # the decode is never stalled
        chunks += [len(p.tokens) for p in s.prefills if p.request_id == 1]
        for ch in s.decodes + s.prefills:
            if ch.sample:
                sched.on_token(ch.request_id, 1, eng.now)
    assert chunks == [8, 8, 8, 8, 8]


def test_preemption_by_recompute_when_pages_run_out():
    sched = make(num_pages=12, page_size=4, max_batch=4)
    eng = MockEngine(sched, random.Random(1))
    eng.rng.random = lambda: 1.0  # no random early finish
    for i in range(4):
        sched.add(SchedRequest(i, prompt=list(range(8)), max_tokens=12))
    for _ in range(200):
        if not sched.has_work():
            break
        eng.step()
    assert sched.stats["preemptions"] > 0
    assert sorted(eng.done) == [0, 1, 2, 3]
    assert sched.memory.num_free == 11


def test_adapters_placed_ahead_evicted_lru_and_held_while_running():
    sched = make(num_pages=40, max_batch=2)
    ranks = {"q_proj": 8, "v_proj": 8}
    need = sched.memory.adapter_pages_needed(ranks)
    for i in range(6):
        sched.add(SchedRequest(i, prompt=[1, 2, 3], max_tokens=3, adapter=f"a{i}", adapter_ranks=ranks))
    s = sched.schedule(0.0)
    admitted = {p.adapter for p in s.prefills}
    assert admitted == {"a0", "a1"}
    assert {"a2", "a3"} <= set(s.load_adapters)  # placed ahead of use, from the waiting queue
    for name in admitted:
        assert sched.memory.adapters[name].refcount == 1
    assert need > 0
    eng = MockEngine(sched, random.Random(2))
    eng.execute(s)
    while sched.has_work():
        eng.step()
    assert sched.stats["adapter_loads"] == 6
    for name in list(sched.memory.evictable()):
        sched.memory.evict(name)
    assert sched.memory.num_free == 39


def test_deadline_early_abort():
    sched = make(max_batch=1)
    sched.prefill_seconds_per_token = 0.1
    sched.add(SchedRequest(0, prompt=[1] * 10, max_tokens=3))
    sched.add(SchedRequest(1, prompt=[1] * 10, max_tokens=3, deadline=0.5))  # needs ~1 s of prefill
    sched.add(SchedRequest(2, prompt=[1] * 2, max_tokens=3, deadline=100.0))
    s = sched.schedule(0.0)
    assert s.aborted == [(1, "deadline")]
    assert 1 not in sched.requests


def test_cancel_frees_pages_at_once():
    sched = make()
    sched.add(SchedRequest(0, prompt=list(range(30)), max_tokens=10))
    sched.schedule(0.0)
    assert sched.memory.page_tables[0]
    sched.cancel(0)
    assert 0 not in sched.memory.page_tables and sched.memory.num_free == 63


@pytest.mark.parametrize("seed", [0, 1])
def test_pool_accounting_property_1000_random_requests(seed):
    rng = random.Random(seed)
    sched = make(
        num_pages=48, page_size=4, max_batch=6, max_prefill_tokens=24, max_prefill_seqs=3, max_chunk=10
    )
    eng = MockEngine(sched, rng)
    adapter_ranks = {
        f"ad{i}": {m: rng.choice([1, 4, 8, 16]) for m in rng.sample([s[0] for s in SHAPES], 3)}
        for i in range(12)
    }
    next_id, added = 0, 0
    while added < 1000 or sched.has_work():
        for _ in range(rng.randrange(4)):
            if added < 1000:
                adapter = rng.choice([None, *adapter_ranks])
                deadline = eng.now + rng.uniform(0, 1) if rng.random() < 0.1 else None
                sched.add(
                    SchedRequest(
                        next_id,
                        prompt=[1] * rng.randrange(1, 60),
                        max_tokens=rng.randrange(1, 30),
                        adapter=adapter,
                        adapter_ranks=adapter_ranks.get(adapter),
                        arrival=eng.now,
                        deadline=deadline,
                    )
                )
                next_id += 1
                added += 1
        if sched.requests and rng.random() < 0.1:  # cancellations, waiting or running
            rid = rng.choice(list(sched.requests))
            sched.cancel(rid)
            eng.done[rid] = "cancel"
        eng.step()
    assert len(eng.done) == 1000
    assert not sched.memory.page_tables
    assert all(a.refcount == 0 for a in sched.memory.adapters.values())
    for name in list(sched.memory.evictable()):
        sched.memory.evict(name)
    assert sched.memory.num_free == sched.memory.layout.num_pages - 1  # every page is free again
    sched.memory.check_invariants()
