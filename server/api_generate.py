"""POST /generate: text plus, on request, the routing and cache story of every token."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from .stream import RequestStream, TokenEvent, routing_counts
from .routing import pathway_summary
from .schemas import ErrorResponse, GenerateRequest, GenerateResponse
from .serving import (EventStreamResponse, check_context, check_model, encode_prompt, result_or_disconnect,
                      sampling_params, sse, submit)

router = APIRouter()
ENDPOINT = "/generate"

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
SSE_DOC = {"content": {"text/event-stream": {"example":
    'event: token\ndata: {"index":0,"token_id":612,"text":" there","layers":[{"layer":0,"experts":[3,17,5,30],'
    '"weights":[0.41,0.27,0.19,0.13],"cache":["hit","miss","hit","hit"]}]}\n\n'
    'event: final\ndata: {"text":" there","token_ids":[612],"finish_reason":"length",'
    '"usage":{"prompt_tokens":4,"completion_tokens":1},"trace":{"summary":{"hits":3,"misses":1}}}\n\n'}},
    "description": "With stream=true: one `token` event per generated token (with its routing when tracing), "
                   "then one `final` event (the text, finish reason, usage and, when tracing, the summary)."}


@router.post(ENDPOINT, response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**ERRORS, 200: SSE_DOC}, summary="Generate text, optionally with a routing trace",
             tags=["generation"])
async def generate(body: GenerateRequest, request: Request,
                   trace: bool = Query(False, description="Same as trace in the body.")):
    state = request.app.state.cadre
    engine = state.require_engine()
    check_model(body.model, state.model_name)
    params = sampling_params(body.max_new_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stop)
    prompt_ids = encode_prompt(engine, body.prompt)
    check_context(len(prompt_ids), body.max_new_tokens, engine.config.max_model_len, "max_new_tokens")
    stream = await submit(engine, prompt_ids, params, trace=body.trace or trace)
    if body.stream:
        return EventStreamResponse(token_events(stream), stream, ENDPOINT)
    await result_or_disconnect(request, stream, ENDPOINT)
    return final_body(stream, with_steps=True)


def step_body(event: TokenEvent) -> dict:
    return {"token_id": event.token_id, "text": event.text, "layers": event.layers or []}


def final_body(stream: RequestStream, with_steps: bool) -> dict:
    """The reply (or the stream's final event, whose steps went out one by one)."""
    body = {"text": stream.text, "token_ids": stream.token_ids, "finish_reason": stream.finish_reason,
            "usage": {"prompt_tokens": len(stream.prompt_ids), "completion_tokens": len(stream.token_ids)}}
    if stream.trace:
        summary = {**routing_counts(stream), "pathways": pathway_summary([event.layers or [] for event in stream.steps])}
        body["trace"] = {"steps": [step_body(e) for e in stream.steps], "summary": summary} if with_steps \
            else {"summary": summary}
    return body


async def token_events(stream: RequestStream):
    async for event in stream.events():
        yield sse({"index": event.index, **step_body(event)} if stream.trace else
                  {"index": event.index, "token_id": event.token_id, "text": event.text}, event="token")
    if stream.finish_reason in ("error", "cancelled"):
        yield sse({"error": {"message": stream.error or f"request {stream.finish_reason}",
                             "type": "server_error", "param": None, "code": stream.finish_reason}}, event="error")
        return
    yield sse(final_body(stream, with_steps=False), event="final")
