"""AsyncEngine: an asyncio front over Engine. One background thread owns the runner and drives its
steps; the event loop only validates requests and hands commands over (it never waits for a step).
A cancelled await cancels its request, and the engine thread frees its pages before its next step."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from jlora.api import Engine, Prompt, StreamChunk
from jlora.errors import InvalidRequestError
from jlora.generate import SequenceState
from jlora.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(InvalidRequestError):
    """The engine's queue is full; try again later."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int | None = None):
        if engine.reference:
            raise InvalidRequestError("AsyncEngine needs the paged engine")
        self.engine = engine
        self.max_queue = max_queue
        self._commands: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # key -> target
        self._key_of: dict[int, int] = {}  # runner request id -> key (engine thread only)
        self._rid_of: dict[int, int] = {}  # key -> runner request id (engine thread only)
        self._keys = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jlora-engine", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        return len(self._listeners)

    # ---- the engine thread --------------------------------------------------------------------------
    def _apply(self, command: tuple) -> None:
        runner = self.engine.runner
        if command[0] == "add":
            _, key, state, adapter, deadline = command
            if key not in self._listeners:  # cancelled before it started
                return
            try:
                rid = runner.add(state, adapter, deadline)
            except Exception as e:  # e.g. the adapter was unloaded in between
                self._emit(key, e)
                return
            self._key_of[rid], self._rid_of[key] = key, rid
        elif command[0] == "cancel":
            rid = self._rid_of.pop(command[1], None)
            if rid is not None:
                runner.cancel(rid)
                self._key_of.pop(rid, None)

    def _loop(self) -> None:
        runner = self.engine.runner
        while True:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while True:
                with self.engine._lock:
                    while self._commands:
                        self._apply(self._commands.popleft())
                    if not runner.has_work():
                        break
                    try:
                        events = runner.step()
                    except Exception as e:  # an engine failure ends every request with an error, not a hang
                        log.exception("engine step failed; ending %d requests", len(self._rid_of))
                        for key, rid in list(self._rid_of.items()):
                            runner.cancel(rid)
                            self._emit(key, e)
                        self._rid_of.clear()
                        self._key_of.clear()
                        continue
                for event in events:
                    key = self._key_of.get(event.request_id)
                    if key is None:
                        continue
                    if event.finish_reason is not None:
                        self._key_of.pop(event.request_id, None)
                        self._rid_of.pop(key, None)
                    self._emit(key, event)
            if self._stopping and not self._commands:
                return

    def _emit(self, key: int, item: Any) -> None:
        target = self._listeners.get(key)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    # ---- the event loop side ------------------------------------------------------------------------
    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: str | None = None,
        deadline: float | None = None,
    ) -> tuple[int, asyncio.Queue, SequenceState]:
        """Validate and enqueue; raises jlora errors at once for bad input or a full queue."""
        if self.max_queue is not None and len(self._listeners) >= self.max_queue:
            raise QueueFullError(f"queue full ({self.max_queue} requests)")
        state = self.engine._prepare(prompt, params, adapter)
        key = next(self._keys)
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[key] = (asyncio.get_running_loop(), queue)
        self._commands.append(("add", key, state, adapter, deadline))
        self._wake.set()
        return key, queue, state

    def cancel(self, key: int) -> None:
        if self._listeners.pop(key, None) is not None:
            self._commands.append(("cancel", key))
            self._wake.set()

    async def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        key, queue, state = self.submit(prompt, params or SamplingParams(), adapter, deadline)
        tokenizer = self.engine.tokenizer
        emitted, done = "", False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.finish_reason is not None
                text = state.text if done else (tokenizer.decode(state.generated) if tokenizer else "")
                delta, emitted = text[len(emitted) :], text
                yield StreamChunk(item.token, delta, item.logprob, item.finish_reason)
        finally:
            if done:
                self._listeners.pop(key, None)
            else:
                self.cancel(key)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        deadline: float | None = None,
    ) -> RequestOutput:
        params = params or SamplingParams()
        tokens: list[int] = []
        logprobs: list[float] = []
        text, reason = "", "length"
        async for chunk in self.stream(prompt, params, adapter, deadline):
            if chunk.token_id is not None:
                tokens.append(chunk.token_id)
                logprobs.append(chunk.logprob if chunk.logprob is not None else 0.0)
            text += chunk.text
            reason = chunk.finish_reason or reason
        prompt_ids: Sequence[int]
        if isinstance(prompt, str):
            prompt_ids = self.engine.tokenizer.encode(prompt) if self.engine.tokenizer else []
        else:
            prompt_ids = list(prompt)
        return RequestOutput(
            text=text,
            token_ids=tokens,
            logprobs=logprobs if params.logprobs else None,
            finish_reason=reason,
            prompt_token_ids=list(prompt_ids),
            adapter=adapter,
        )

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
