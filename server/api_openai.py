"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

Streams send text deltas that no stop string can still claim, so the concatenated deltas
always equal the non-streamed text; usage comes in a last chunk when
stream_options.include_usage is set, and every stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from .chat import render_chat
from .engine import Engine, RequestStream
from .errors import APIError
from .schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                      ErrorResponse, ModelList, OpenAISampling)
from .serving import (EventStreamResponse, check_context, check_model, encode_prompt, result_or_disconnect,
                      sampling_params, sse, submit)

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # OpenAI has no "eos"


@router.get("/models", response_model=ModelList, summary="The served model")
async def list_models(request: Request):
    state = request.app.state.cadre
    engine = state.engine
    batching = (engine.batching or engine.kind) if engine is not None else None  # continuous | static | decoder
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "cadre", "max_model_len": state.max_model_len,
                                        "batching": batching}]}


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_none=True,
             responses=ERRORS, summary="OpenAI text completion (streaming with stream=true)")
async def completions(body: CompletionRequest, request: Request):
    engine, served = prepare(request, body)
    prompt_ids = encode_prompt(engine, body.prompt)
    max_tokens = body.max_tokens or 16
    check_context(len(prompt_ids), max_tokens, engine.config.max_model_len, "max_tokens")
    stream = await start(engine, body, prompt_ids, max_tokens)
    if body.stream:
        return EventStreamResponse(completion_chunks(engine, stream, served, body), stream, "/v1/completions")
    await result_or_disconnect(request, stream, "/v1/completions")
    return {"id": stream.request_id, "object": "text_completion", "created": int(time.time()), "model": served,
            "choices": [{"index": 0, "text": stream.text, "logprobs": None,
                         "finish_reason": FINISH_REASONS[stream.finish_reason]}],
            "usage": usage(stream)}


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             summary="OpenAI chat completion (streaming with stream=true)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine, served = prepare(request, body)
    prompt_ids = render_chat(engine.tokenizer, body.messages)
    limit = engine.config.max_model_len
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if requested is None and len(prompt_ids) >= limit:
        raise APIError(400, f"the conversation ({len(prompt_ids)} tokens) fills the context window of {limit} "
                            "tokens", param="messages", code="context_length_exceeded")
    max_tokens = requested or limit - len(prompt_ids)
    check_context(len(prompt_ids), max_tokens, limit, param)
    stream = await start(engine, body, prompt_ids, max_tokens)
    if body.stream:
        return EventStreamResponse(chat_chunks(engine, stream, served, body), stream, "/v1/chat/completions")
    await result_or_disconnect(request, stream, "/v1/chat/completions")
    return {"id": stream.request_id, "object": "chat.completion", "created": int(time.time()), "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.text}, "logprobs": None,
                         "finish_reason": FINISH_REASONS[stream.finish_reason]}],
            "usage": usage(stream)}


def prepare(request: Request, body: OpenAISampling) -> tuple[Engine, str]:
    state = request.app.state.cadre
    engine = state.require_engine()
    check_model(body.model, state.model_name)
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")
    return engine, state.model_name


async def start(engine: Engine, body: OpenAISampling, prompt_ids: list[int], max_tokens: int) -> RequestStream:
    params = sampling_params(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stop)
    return await submit(engine, prompt_ids, params, trace=False)


def usage(stream: RequestStream) -> dict:
    prompt, completion = len(stream.prompt_ids), len(stream.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def text_deltas(engine: Engine, stream: RequestStream):
    """(delta, finish_reason) pairs: text safe to send as it grows, then the rest with the reason."""
    sent = 0
    async for _ in stream.events():
        safe = engine.stable_text(stream)
        if len(safe) > sent:
            yield safe[sent:], None
            sent = len(safe)
    if stream.finish_reason in FINISH_REASONS:
        yield stream.text[sent:], FINISH_REASONS[stream.finish_reason]


def stream_failure(stream: RequestStream) -> str:
    return sse({"error": {"message": stream.error or f"request {stream.finish_reason}", "type": "server_error",
                          "param": None, "code": stream.finish_reason}})


async def completion_chunks(engine: Engine, stream: RequestStream, served: str, body: CompletionRequest):
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": stream.request_id, "object": "text_completion", "created": created, "model": served,
                    "choices": choices, **extra})

    async for delta, reason in text_deltas(engine, stream):
        yield chunk([{"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}])
    if stream.finish_reason not in FINISH_REASONS:
        yield stream_failure(stream)
    elif body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(stream))
    yield sse("[DONE]")


async def chat_chunks(engine: Engine, stream: RequestStream, served: str, body: ChatCompletionRequest):
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": stream.request_id, "object": "chat.completion.chunk", "created": created, "model": served,
                    "choices": choices, **extra})

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}])
    async for delta, reason in text_deltas(engine, stream):
        yield chunk([{"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": None,
                      "finish_reason": reason}])
    if stream.finish_reason not in FINISH_REASONS:
        yield stream_failure(stream)
    elif body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(stream))
    yield sse("[DONE]")
