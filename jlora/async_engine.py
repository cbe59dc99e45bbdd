"""AsyncEngine: an asyncio front over Engine. One background thread drives the engine's steps;
callers await results or iterate streams; a cancelled await cancels its request (pages freed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from jlora.api import Engine, Prompt, StreamChunk
from jlora.errors import InvalidRequestError
from jlora.request import RequestOutput, SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int | None = None):
        if engine.reference:
            raise InvalidRequestError("AsyncEngine needs the paged engine")
        self.engine = engine
        self.max_queue = max_queue
        self._wake = threading.Condition(engine._lock)
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jlora-engine", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        return len(self._listeners)

    def _loop(self) -> None:
        runner = self.engine.runner
        while True:
            with self._wake:
                while not runner.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping and not runner.has_work():
                    return
                try:
                    events = runner.step()
                except Exception as e:  # an engine failure ends every request with an error, not a hang
                    for rid in list(self._listeners):
                        runner.cancel(rid)
                        self._emit(rid, e)
                    continue
                for event in events:
                    self._emit(event.request_id, event)

    def _emit(self, rid: int, item: Any) -> None:
        target = self._listeners.get(rid)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def submit(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None = None, deadline: float | None = None
    ) -> tuple[int, asyncio.Queue]:
        """Validate and enqueue; raises jlora errors at once for bad input or a full queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if self.max_queue is not None and len(self._listeners) >= self.max_queue:
                raise QueueFullError(f"queue full ({self.max_queue} requests)")
            state = self.engine._prepare(prompt, params, adapter)
            rid = self.engine.runner.add(state, adapter, deadline)
            self._listeners[rid] = (loop, queue)
            self._wake.notify()
        return rid, queue

    def cancel(self, rid: int) -> None:
        with self._wake:
            self.engine.runner.cancel(rid)
            self._listeners.pop(rid, None)

    async def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        params = params or SamplingParams()
        rid, queue = self.submit(prompt, params, adapter, deadline)
        state = self.engine.runner.states[rid]
        tokenizer = self.engine.tokenizer
        emitted, done = "", False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                done = item.finish_reason is not None
                text = state.text if done else (tokenizer.decode(state.generated) if tokenizer else "")
                delta, emitted = text[len(emitted):], text
                yield StreamChunk(item.token, delta, item.logprob, item.finish_reason)
        finally:
            if not done:
                self.cancel(rid)
            self._listeners.pop(rid, None)

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None,
        deadline: float | None = None,
    ) -> RequestOutput:
        params = params or SamplingParams()
        tokens: list[int] = []
        logprobs: list[float] = []
        text, reason = "", "length"
        prompt_ids: Sequence[int] = []
        async for chunk in self.stream(prompt, params, adapter, deadline):
            if chunk.token_id is not None:
                tokens.append(chunk.token_id)
                logprobs.append(chunk.logprob if chunk.logprob is not None else 0.0)
            text += chunk.text
            reason = chunk.finish_reason or reason
        if isinstance(prompt, str):
            prompt_ids = self.engine.tokenizer.encode(prompt) if self.engine.tokenizer else []
        else:
            prompt_ids = list(prompt)
        return RequestOutput(text=text, token_ids=tokens, logprobs=logprobs if params.logprobs else None,
                             finish_reason=reason, prompt_token_ids=list(prompt_ids), adapter=adapter)

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)


class QueueFullError(InvalidRequestError):
    """The engine's queue is full; try again later."""
