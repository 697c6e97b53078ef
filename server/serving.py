"""What every generation endpoint does around the engine: admit, watch the client, stream."""

from __future__ import annotations

import asyncio
import json
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .engine import Engine, EngineUnavailable
from .stream import RequestStream, log_request
from .errors import APIError
from .logs import log_event
from .sampling import SamplingParams
from .schemas import MAX_STOP_STRINGS

GREEDY_BELOW = 1e-5  # temperatures this small would overflow the softmax; they mean greedy


def sampling_params(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                    stop: list[str] | str | None, **more) -> SamplingParams:
    """SamplingParams from a request's values; `more`: SamplingParams' other fields, already checked."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0 if temperature < GREEDY_BELOW else temperature,
                          top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stops), **more)


def check_token_ids(engine: Engine, ids, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})", param=param)


def encode_prompt(engine: Engine, prompt: str | list[int], param: str = "prompt",
                  add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, list):
        check_token_ids(engine, prompt, param)
        ids = list(prompt)
    elif engine.tokenizer is None:
        raise APIError(400, "this model's store has no tokenizer: send the prompt as token ids", param=param)
    else:
        ids = engine.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    if not ids:
        raise APIError(400, "prompt is empty", param=param)
    return ids


def check_context(prompt_len: int, max_new_tokens: int, limit: int, param: str) -> None:
    if prompt_len + max_new_tokens > limit:
        raise APIError(400, f"prompt ({prompt_len} tokens) + {param} ({max_new_tokens}) = "
                            f"{prompt_len + max_new_tokens} exceeds the context window of {limit} tokens",
                       param=param, code="context_length_exceeded")


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"model '{requested}' does not exist; this server serves '{served}' (see /v1/models)",
                       param="model", code="model_not_found")


def unavailable(engine: Engine, exc: EngineUnavailable, prompt_tokens: int) -> APIError:
    engine.metrics.rejections.labels(exc.reason).inc()
    log_event("rejected", reason=exc.reason, prompt_tokens=prompt_tokens)
    return APIError(503, str(exc), code=exc.reason, headers={"Retry-After": str(engine.config.retry_after_s)})


async def submit(engine: Engine, prompt_ids: list[int], params: SamplingParams, trace: bool) -> RequestStream:
    try:
        return await engine.submit(prompt_ids, params, trace=trace)
    except EngineUnavailable as exc:
        raise unavailable(engine, exc, len(prompt_ids)) from None


async def submit_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[RequestStream]:
    """One stream per (prompt ids, params), all admitted or none (503)."""
    try:
        engine.check_capacity(len(jobs))
    except EngineUnavailable as exc:
        raise unavailable(engine, exc, sum(len(ids) for ids, _ in jobs)) from None
    streams: list[RequestStream] = []
    try:
        for ids, params in jobs:
            streams.append(await submit(engine, ids, params, trace=False))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def result_or_disconnect(request: Request, stream: RequestStream, endpoint: str) -> RequestStream:
    """The finished stream; a client that hangs up first cancels its generation."""
    await results_or_disconnect(request, [stream], endpoint)
    return stream


async def results_or_disconnect(request: Request, streams: list[RequestStream], endpoint: str) -> None:
    """Wait for every stream; a client that hangs up first cancels them all."""
    async def all_done():
        for stream in streams:
            await stream.result()

    done = asyncio.ensure_future(all_done())
    gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            for stream in streams:
                stream.cancel()
            done.cancel()
    for stream in streams:
        log_request(stream, endpoint)
    for stream in streams:
        raise_if_failed(stream)


def raise_if_failed(stream: RequestStream) -> None:
    if stream.finish_reason == "error":
        if stream._engine is not None and not stream._engine.store_available():
            raise APIError(503, f"expert store unavailable: {stream.error}", code="store_unavailable",
                           headers={"Retry-After": "5"})
        raise APIError(500, f"generation failed: {stream.error}", type="server_error")
    if stream.finish_reason == "cancelled":
        raise APIError(503, "request cancelled (client disconnected or server shutting down)",
                       code="cancelled", headers={"Retry-After": "1"})


def sse(data, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE whose generator is cancelled the moment the client disconnects.

    Starlette, under ASGI >= 2.4 servers, notices a disconnect only when a send fails, i.e.
    at the next token; a queued or slow request would keep its place until then. Listening
    for http.disconnect alongside frees the batch slot at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content, streams: RequestStream | list[RequestStream], endpoint: str):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streams = streams if isinstance(streams, list) else [streams]
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (body, gone):
                task.cancel()
            outcome, _ = await asyncio.gather(body, gone, return_exceptions=True)
            for stream in self.streams:
                stream.cancel()  # no-op when it finished
                log_request(stream, self.endpoint)
        if isinstance(outcome, Exception) and not isinstance(outcome, OSError):  # OSError: the client left
            raise outcome
