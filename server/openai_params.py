"""An OpenAI request's parameters -> what the engine runs: prompts, and SamplingParams per choice.

Checks here are the ones pydantic cannot make alone (they need the model, or relate two
parameters); each failure is a 400 naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .detokenize import IncrementalDetokenizer
from .engine import Engine
from .errors import APIError
from .grammar import regex_for
from .logprobs import text_offsets
from .sampling import SamplingParams
from .schemas import MAX_SEED
from .schemas_openai import ChatCompletionRequest, CompletionRequest, OpenAISampling
from .serving import check_context, check_token_ids, encode_prompt, sampling_params


@dataclass
class Prompt:
    """One prompt of a request: its ids and, for echo, its text and each token's offset in it."""

    ids: list[int]
    text: str = ""
    offsets: list[int] | None = None


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def completion_prompts(engine: Engine, body: CompletionRequest) -> list[Prompt]:
    """The request's prompts (a string, strings, token ids or lists of them), each checked."""
    raw = body.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    prompts = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt.{i}"
        prompt = Prompt(encode_prompt(engine, item, param=param))
        if body.echo:
            prompt.text, prompt.offsets = echo_text(engine, prompt.ids, item if isinstance(item, str) else None)
        check_context(len(prompt.ids), body.max_tokens, engine.config.max_model_len, "max_tokens")
        prompts.append(prompt)
    return prompts


def echo_text(engine: Engine, ids: list[int], given: str | None) -> tuple[str, list[int]]:
    """The prompt as echoed (the string sent, else its decoding) and each token's offset in it."""
    detokenizer = IncrementalDetokenizer(engine.tokenizer) if engine.tokenizer is not None else None
    if detokenizer is None:
        return "", [0] * len(ids)
    pieces = [detokenizer.add(t) for t in ids]
    return (given if given is not None else detokenizer.text), text_offsets(pieces)


def check_completion(body: CompletionRequest) -> None:
    if body.suffix:
        raise unsupported("suffix", "suffix (text insertion) is not supported")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
    if body.best_of is not None and body.best_of < body.n:
        raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", param="best_of")
    if body.stream and choices_per_prompt(body) > body.n:
        raise APIError(400, "best_of > n cannot be streamed", param="best_of")
    check_sampling(body, body.max_tokens)


def check_chat(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise unsupported("tools", "tools (function calling) are not supported")
    if body.tool_choice not in (None, "none"):
        raise unsupported("tool_choice", "tool_choice other than 'none' is not supported (no tools)")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if constrained(body) and (body.min_tokens or body.ignore_eos):
        raise APIError(400, "response_format ends the output when the JSON is complete: it cannot be combined with "
                            "min_tokens or ignore_eos", param="response_format")
    check_sampling(body, body.max_completion_tokens or body.max_tokens)


def constrained(body: ChatCompletionRequest) -> bool:
    return body.response_format is not None and body.response_format.type != "text"


async def grammar_for(engine: Engine, body: ChatCompletionRequest):
    """The compiled grammar a chat request's response_format asks for (None: plain text)."""
    if not constrained(body):
        return None
    if engine.tokenizer is None or not engine.eos_token_ids:
        raise unsupported("response_format", "constrained decoding needs the model's tokenizer and an EOS token")
    regex = regex_for(body.response_format)
    try:
        return await engine.grammars.index(regex)
    except Exception as exc:  # noqa: BLE001 -- e.g. a schema no token sequence of this vocabulary can match
        raise APIError(400, f"response_format: cannot build its grammar ({type(exc).__name__}: {exc})",
                       param="response_format") from None


def check_sampling(body: OpenAISampling, max_tokens: int | None) -> None:
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds the maximum ({max_tokens})",
                       param="min_tokens")


def choices_per_prompt(body: CompletionRequest) -> int:
    return body.best_of or body.n


def choice_params(engine: Engine, body: OpenAISampling, max_tokens: int, logprobs: int | None,
                  choice: int, grammar=None) -> SamplingParams:
    """The sampling of one choice: choice i of a seeded request samples with seed + i."""
    check_token_ids(engine, body.stop_token_ids or [], "stop_token_ids")
    bias = tuple((int(k), v) for k, v in (body.logit_bias or {}).items())
    check_token_ids(engine, [t for t, _ in bias], "logit_bias")
    seed = (body.seed + choice) % (MAX_SEED + 1) if body.seed is not None else None
    return sampling_params(max_tokens, body.temperature, body.top_p, body.top_k, seed, body.stop,
                           stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                           min_tokens=body.min_tokens, presence_penalty=body.presence_penalty,
                           frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                           logit_bias=bias, logprobs=logprobs, grammar=grammar)
