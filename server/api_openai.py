"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

A request becomes one engine stream per choice: per prompt (completions take a string, a
list of strings, token ids or a list of token-id lists), `n` choices -- or `best_of`, of
which the n with the highest mean token logprob are returned. Choice indices run
prompt-major (prompt i, choice j -> i * n + j). `echo` with `logprobs` scores the prompt
in one forward outside the batch (Engine.score), so `max_tokens: 0` costs no generation.

Streams send text deltas that no stop string can still claim, so the concatenated deltas
always equal the non-streamed text; usage comes in a last chunk when
stream_options.include_usage is set (and, per choice, in every chunk with vLLM's
continuous_usage_stats), and every stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from bisect import bisect_left
from dataclasses import dataclass

from fastapi import APIRouter, Request

from .chat import render_chat
from .engine import Engine, EngineUnavailable
from .stream import RequestStream
from .errors import APIError
from .logprobs import chat_logprobs, completion_logprobs
from .openai_params import (Prompt, check_chat, check_completion, choice_params, choices_per_prompt,
                            completion_prompts, grammar_for)
from .sampling import StepResult
from .schemas import ErrorResponse
from .schemas_openai import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                             ModelList, OpenAISampling)
from .serving import (EventStreamResponse, check_context, check_model, results_or_disconnect, sse, submit_all,
                      unavailable)

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # OpenAI has no "eos"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass
class Choice:
    index: int
    prompt: Prompt
    stream: RequestStream | None  # None: echo with max_tokens 0 (nothing generated)
    prompt_logprobs: list[StepResult | None] | None = None  # echo + logprobs


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
    check_completion(body)
    prompts = completion_prompts(engine, body)
    per_prompt = choices_per_prompt(body)
    capture = body.logprobs if body.logprobs is not None else 0 if per_prompt > body.n else None
    params = [choice_params(engine, body, body.max_tokens, capture, j) for j in range(per_prompt)] \
        if body.max_tokens else []
    scored = [await score(engine, p.ids, body.logprobs) if body.echo and body.logprobs is not None else None
              for p in prompts]
    streams = await submit_all(engine, [(p.ids, sp) for p in prompts for sp in params])
    groups = [streams[i * len(params):(i + 1) * len(params)] for i in range(len(prompts))]
    reply = Reply(engine, served, "text_completion", streams, prompts)
    if body.stream:  # best_of == n here (check_completion)
        chunks = [completion_chunks(reply, body, c) for c in make_choices(prompts, groups, scored, body.n)]
        return EventStreamResponse(reply.stream_body(chunks, body), streams, COMPLETIONS)
    await results_or_disconnect(request, streams, COMPLETIONS)
    if per_prompt > body.n:
        groups = [best(group, body.n) for group in groups]
    choices = make_choices(prompts, groups, scored, body.n)
    return reply.body([completion_choice(reply, body, c) for c in choices])


@router.post("/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_none=True,
             responses=ERRORS, summary="OpenAI chat completion (streaming with stream=true)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine, served = prepare(request, body)
    check_chat(body)
    prompt = Prompt(render_chat(engine.tokenizer, body.messages))
    limit = engine.config.max_model_len
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if requested is None and len(prompt.ids) >= limit:
        raise APIError(400, f"the conversation ({len(prompt.ids)} tokens) fills the context window of {limit} "
                            "tokens", param="messages", code="context_length_exceeded")
    max_tokens = requested or limit - len(prompt.ids)
    check_context(len(prompt.ids), max_tokens, limit, param)
    capture = (body.top_logprobs or 0) if body.logprobs else None
    grammar = await grammar_for(engine, body)
    params = [choice_params(engine, body, max_tokens, capture, j, grammar) for j in range(body.n)]
    streams = await submit_all(engine, [(prompt.ids, sp) for sp in params])
    choices = [Choice(j, prompt, stream) for j, stream in enumerate(streams)]
    reply = Reply(engine, served, "chat.completion", streams, [prompt])
    if body.stream:
        return EventStreamResponse(reply.stream_body([chat_chunks(reply, body, c) for c in choices], body),
                                   streams, CHAT)
    await results_or_disconnect(request, streams, CHAT)
    return reply.body([chat_choice(reply, body, c) for c in choices])


def prepare(request: Request, body: OpenAISampling) -> tuple[Engine, str]:
    state = request.app.state.cadre
    engine = state.require_engine()
    check_model(body.model, state.model_name)
    return engine, state.model_name


async def score(engine: Engine, prompt_ids: list[int], top_n: int) -> list[StepResult | None]:
    try:
        return await engine.score(prompt_ids, top_n)
    except EngineUnavailable as exc:
        raise unavailable(engine, exc, len(prompt_ids)) from None
    except Exception as exc:  # noqa: BLE001 -- a failed forward: name it, the server goes on
        raise APIError(500, f"prompt scoring failed: {type(exc).__name__}: {exc}", type="server_error") from None


def make_choices(prompts: list[Prompt], groups: list[list[RequestStream]], scored: list, n: int) -> list[Choice]:
    """n choices per prompt, prompt-major; with nothing generated (echo, max_tokens 0) each is the echo."""
    return [Choice(i * n + j, prompt, stream, scored[i])
            for i, prompt in enumerate(prompts) for j, stream in enumerate(groups[i] or [None] * n)]


def best(streams: list[RequestStream], n: int) -> list[RequestStream]:
    """best_of: the n streams with the highest mean token logprob (OpenAI's "best")."""
    def mean_logprob(stream: RequestStream) -> float:
        values = [entry.logprob for entry in stream.logprobs]
        return sum(values) / len(values) if values else float("-inf")

    return sorted(streams, key=mean_logprob, reverse=True)[:n]


class Reply:
    """What every choice of one response shares: id, timestamps, usage."""

    def __init__(self, engine: Engine, served: str, kind: str, streams: list[RequestStream], prompts: list[Prompt]):
        self.engine, self.served, self.kind, self.streams, self.prompts = engine, served, kind, streams, prompts
        self.id = streams[0].request_id if streams else f"cmpl-{secrets.token_hex(8)}"
        self.created = int(time.time())
        self.vocab = engine.vocabulary

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        return counts(prompt, sum(len(s.token_ids) for s in self.streams))

    def body(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.served,
                "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        return sse({"id": self.id, "object": kind, "created": self.created, "model": self.served,
                    "choices": choices, **extra})

    async def stream_body(self, per_choice: list, body: OpenAISampling):
        """The choices' chunks as they come, then usage (if asked) and [DONE]."""
        async for chunk in merged(per_choice):
            yield chunk
        if body.stream_options and body.stream_options.include_usage \
                and all(s.finish_reason in FINISH_REASONS for s in self.streams):
            yield self.chunk([], usage=self.usage())
        yield sse("[DONE]")


def counts(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_usage(choice: Choice) -> dict:
    return counts(len(choice.prompt.ids), len(choice.stream.token_ids) if choice.stream else 0)


def visible_tokens(stream: RequestStream) -> int:
    """Tokens that spelled the returned text: all, unless a stop string cut it (then not its tokens)."""
    if stream.text == stream.detokenizer.text:
        return len(stream.token_ids)
    return bisect_left(stream.offsets, len(stream.text))


async def token_deltas(engine: Engine, stream: RequestStream):
    """(text delta, range of the tokens it releases, finish_reason or None), as the text grows."""
    sent = tokens = 0
    async for _ in stream.events():
        safe = engine.stable_text(stream)
        if len(safe) > sent:
            upto = bisect_left(stream.offsets, len(safe))
            yield safe[sent:], range(tokens, upto), None
            sent, tokens = len(safe), upto
    if stream.finish_reason in FINISH_REASONS:
        yield stream.text[sent:], range(tokens, max(tokens, visible_tokens(stream))), \
            FINISH_REASONS[stream.finish_reason]


async def merged(generators: list):
    """Items of several async generators as each produces them."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(generator):
        try:
            async for item in generator:
                await queue.put(item)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(g)) for g in generators]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
        for task in tasks:
            task.result()  # a generator's exception surfaces here
    finally:
        for task in tasks:
            task.cancel()


def stream_failure(stream: RequestStream) -> str:
    return sse({"error": {"message": stream.error or f"request {stream.finish_reason}", "type": "server_error",
                          "param": None, "code": stream.finish_reason}})


def running_usage(body: OpenAISampling, choice: Choice) -> dict:
    """vLLM's continuous_usage_stats: this choice's usage so far, in each of its chunks."""
    if body.stream_options and body.stream_options.continuous_usage_stats:
        return {"usage": choice_usage(choice)}
    return {}


# --- completions --------------------------------------------------------------------------------

def completion_choice(reply: Reply, body: CompletionRequest, choice: Choice) -> dict:
    stream, prompt = choice.stream, choice.prompt
    echoed = prompt.text if body.echo else ""
    item = {"index": choice.index, "text": echoed + (stream.text if stream else ""), "logprobs": None,
            "finish_reason": FINISH_REASONS[stream.finish_reason] if stream else "length",
            "usage": choice_usage(choice)}
    if body.logprobs is not None:
        ids, entries, offsets = [], [], []
        if body.echo:
            ids, entries, offsets = list(prompt.ids), list(choice.prompt_logprobs), list(prompt.offsets)
        if stream is not None:
            shown = visible_tokens(stream)
            ids += stream.token_ids[:shown]
            entries += stream.logprobs[:shown]
            offsets += [len(echoed) + o for o in stream.offsets[:shown]]
        item["logprobs"] = completion_logprobs(reply.vocab, ids, entries, offsets)
    return item


async def completion_chunks(reply: Reply, body: CompletionRequest, choice: Choice):
    stream, prompt = choice.stream, choice.prompt
    echoed = prompt.text if body.echo else ""
    if body.echo:
        logprobs = completion_logprobs(reply.vocab, prompt.ids, choice.prompt_logprobs, prompt.offsets) \
            if body.logprobs is not None else None
        yield reply.chunk([{"index": choice.index, "text": echoed, "logprobs": logprobs,
                            "finish_reason": None if stream else "length"}], **running_usage(body, choice))
    if stream is None:
        return
    async for delta, tokens, reason in token_deltas(reply.engine, stream):
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(reply.vocab, stream.token_ids[tokens.start:tokens.stop],
                                           stream.logprobs[tokens.start:tokens.stop],
                                           [len(echoed) + o for o in stream.offsets[tokens.start:tokens.stop]])
        yield reply.chunk([{"index": choice.index, "text": delta, "logprobs": logprobs, "finish_reason": reason}],
                          **running_usage(body, choice))
    if stream.finish_reason not in FINISH_REASONS:
        yield stream_failure(stream)


# --- chat ------------------------------------------------------------------------------------------

def chat_choice(reply: Reply, body: ChatCompletionRequest, choice: Choice) -> dict:
    stream = choice.stream
    logprobs = None
    if body.logprobs:
        shown = visible_tokens(stream)
        logprobs = chat_logprobs(reply.vocab, stream.token_ids[:shown], stream.logprobs[:shown])
    return {"index": choice.index, "message": {"role": "assistant", "content": stream.text}, "logprobs": logprobs,
            "finish_reason": FINISH_REASONS[stream.finish_reason], "usage": choice_usage(choice)}


async def chat_chunks(reply: Reply, body: ChatCompletionRequest, choice: Choice):
    stream = choice.stream
    yield reply.chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}], **running_usage(body, choice))
    async for delta, tokens, reason in token_deltas(reply.engine, stream):
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(reply.vocab, stream.token_ids[tokens.start:tokens.stop],
                                     stream.logprobs[tokens.start:tokens.stop])
        yield reply.chunk([{"index": choice.index, "delta": {"content": delta} if delta else {},
                            "logprobs": logprobs, "finish_reason": reason}], **running_usage(body, choice))
    if stream.finish_reason not in FINISH_REASONS:
        yield stream_failure(stream)
