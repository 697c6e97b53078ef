"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Clients that count tokens themselves use them; lm-eval's `local-completions` probes
/tokenizer_info and /tokenize and, when both answer, tokenizes through the server, so it
needs no local copy of the tokenizer (its default settings work against cadre as is).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from .chat import render_chat
from .errors import APIError
from .schemas import ErrorResponse
from .schemas_openai import ChatMessage, StrictBody
from .serving import check_model, check_token_ids

router = APIRouter(tags=["tokenizer"])
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}


class TokenizeRequest(StrictBody):
    model: str | None = None
    prompt: str | None = Field(None, description="Text to tokenize ...")
    messages: list[ChatMessage] | None = Field(None, description="... or a conversation, as chat renders it.")
    add_special_tokens: bool = True


class DetokenizeRequest(StrictBody):
    model: str | None = None
    tokens: list[int]


def tokenizer_of(request: Request, model: str | None):
    state = request.app.state.cadre
    engine = state.require_engine()
    check_model(model, state.model_name)
    if engine.tokenizer is None:
        raise APIError(400, "this model's store has no tokenizer", code="no_tokenizer")
    return engine


@router.post("/tokenize", responses=ERRORS, summary="Text (or chat messages) -> token ids")
async def tokenize(body: TokenizeRequest, request: Request):
    engine = tokenizer_of(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        tokens = render_chat(engine.tokenizer, body.messages)
    else:
        tokens = engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
    return {"count": len(tokens), "max_model_len": engine.config.max_model_len, "tokens": tokens}


@router.post("/detokenize", responses=ERRORS, summary="Token ids -> text")
async def detokenize(body: DetokenizeRequest, request: Request):
    engine = tokenizer_of(request, body.model)
    check_token_ids(engine, body.tokens, "tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info", responses=ERRORS, summary="The tokenizer's special tokens and chat template")
async def tokenizer_info(request: Request):
    engine = tokenizer_of(request, None)
    tokenizer = engine.tokenizer
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": engine.config.max_model_len}
