"""The gRPC servicer: translate messages to engine calls and jlora errors to status codes. No model
logic here: everything runs through AsyncEngine."""

from __future__ import annotations

import os
import time

import grpc

from jlora.async_engine import AsyncEngine, QueueFullError
from jlora.errors import (
    AdapterInUseError,
    AdapterLoadError,
    AdapterNotFoundError,
    InvalidRequestError,
    JloraError,
)
from jlora.request import SamplingParams
from jlora.server import jlora_pb2 as pb
from jlora.server import jlora_pb2_grpc as pb_grpc


def confine(path: str, root: str | None) -> str:
    """The real path of an adapter folder, which must lie inside `root` when a root is set."""
    if root is None:
        return path
    if not path or "\x00" in path:
        raise InvalidRequestError("empty adapter path")
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, path))  # absolute paths replace the root here
    if os.path.commonpath([real_root, candidate]) != real_root:
        raise InvalidRequestError(f"adapter path {path!r} is outside the allowed root")
    return candidate


def to_params(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens or 16,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p or 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop) or None,
        stop_token_ids=list(msg.stop_token_ids) or None,
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
    )


class JloraServicer(pb_grpc.JloraServicer):
    def __init__(self, front: AsyncEngine, model_name: str, adapter_root: str | None = None):
        self.front = front
        self.engine = front.engine
        self.model_name = model_name
        self.adapter_root = adapter_root
        self.draining = False

    async def _fail(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        if isinstance(e, QueueFullError):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        if isinstance(e, AdapterNotFoundError):
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if isinstance(e, AdapterInUseError):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if isinstance(e, AdapterLoadError | InvalidRequestError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    async def _check_open(self, context) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining")

    def _prompt(self, request: pb.GenerateRequest):
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if request.chat:
                tok = self.engine.tokenizer
                if tok is None:
                    raise InvalidRequestError("this model has no chat template")
                text = tok.apply_chat_template([{"role": "user", "content": request.text}])
                return tok.encode(text, add_special_tokens=False)
            return request.text
        if kind == "token_ids":
            return list(request.token_ids.ids)
        raise InvalidRequestError("empty prompt")

    def _deadline(self, context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _stream(self, request, context):
        await self._check_open(context)
        try:
            params = to_params(request.params)
            prompt = self._prompt(request)
            stream = self.front.stream(prompt, params, request.adapter or None, self._deadline(context))
            first = await anext(stream)  # validation errors surface here, before anything is sent
        except (JloraError, StopAsyncIteration) as e:
            await self._fail(context, e)
        yield first
        async for chunk in stream:
            yield chunk

    async def Generate(self, request, context):
        text, ids, logprobs, reason = "", [], [], "length"
        async for chunk in self._stream(request, context):
            if chunk.token_id is not None:
                ids.append(chunk.token_id)
                logprobs.append(chunk.logprob or 0.0)
            text += chunk.text
            reason = chunk.finish_reason or reason
        if reason == "deadline":
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "first-token deadline missed")
        n_prompt = self._prompt_len(request)
        return pb.GenerateResponse(
            text=text,
            token_ids=ids,
            logprobs=logprobs if request.params.logprobs else [],
            finish_reason=reason,
            usage=pb.Usage(prompt_tokens=n_prompt, completion_tokens=len(ids)),
        )

    async def GenerateStream(self, request, context):
        count, reason = 0, "length"
        async for chunk in self._stream(request, context):
            if chunk.token_id is not None:
                count += 1
                yield pb.GenerateStreamResponse(
                    token=pb.TokenChunk(
                        token_id=chunk.token_id, text=chunk.text, logprob=chunk.logprob or 0.0
                    )
                )
            reason = chunk.finish_reason or reason
        if reason == "deadline":
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "first-token deadline missed")
        yield pb.GenerateStreamResponse(
            finish=pb.Finish(
                finish_reason=reason,
                usage=pb.Usage(prompt_tokens=self._prompt_len(request), completion_tokens=count),
            )
        )

    def _prompt_len(self, request) -> int:
        prompt = self._prompt(request)
        if isinstance(prompt, str):
            return len(self.engine.tokenizer.encode(prompt)) if self.engine.tokenizer else 0
        return len(prompt)

    async def LoadAdapter(self, request, context):
        await self._check_open(context)
        try:
            path = confine(request.path, self.adapter_root)
            await _in_thread(self.engine.load_adapter, request.name, path)
        except JloraError as e:
            await self._fail(context, e)
        return pb.LoadAdapterResponse()

    async def UnloadAdapter(self, request, context):
        try:
            await _in_thread(self.engine.unload_adapter, request.name, True)
        except JloraError as e:
            await self._fail(context, e)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(
            adapters=[
                pb.AdapterInfo(name=n, path=i["path"], ranks=i["ranks"], bytes=i["bytes"])
                for n, i in self.engine.list_adapters().items()
            ]
        )

    async def ListModels(self, request, context):
        c = self.engine.config
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=self.model_name,
                    architecture=c.architecture,
                    max_model_len=self.engine.max_model_len,
                    vocab_size=c.vocab_size,
                )
            ]
        )


async def _in_thread(fn, *args):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
