"""Request and response bodies (pydantic at the HTTP edge; shapes: shared/DESIGN.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
MAX_SEED = 2**64 - 1  # torch.Generator's seed range
MAX_TEMPERATURE = 100.0  # finite and bounded: beyond this every distribution is flat anyway
# Requests are strict: a boolean must be true/false, an integer an integer (no "yes", no
# true-as-1, no 1.0), numbers finite (no NaN/Infinity).
STRICT = ConfigDict(strict=True, extra="forbid")


# --- /generate -------------------------------------------------------------------------------

class GenerateRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_new_tokens": 32, "temperature": 0, "trace": True},
        {"prompt": "The cache", "max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "seed": 7,
         "stop": ["\n"], "stream": True},
    ]})

    prompt: str = Field(min_length=1, description="Text to continue.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed + same request -> same text.")
    stop: list[str] | str | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings that end the text "
                                                           "(not included in it).")
    stream: bool = Field(False, description="Server-sent events: one per token, then a final one.")
    trace: bool = Field(False, description="Per-token routing and cache outcomes (also ?trace=true).")
    model: str | None = Field(None, description="Optional; must name the served model if given.")


class LayerRouting(BaseModel):
    layer: int
    experts: list[int] = Field(description="Experts the token ran in this layer, in the router's order.")
    weights: list[float] = Field(description="Their routing weights, as the model applies them.")
    cache: list[str] = Field(description="Per expert: hit | miss | prefetched (what the cache did in that forward).")


class TraceStep(BaseModel):
    token_id: int
    text: str
    layers: list[LayerRouting]


class Pathway(BaseModel):
    experts: list[int] = Field(description="Top-1 expert of each MoE layer, in layer order.")
    count: int


class PathwaySummary(BaseModel):
    tokens: int
    distinct: int
    most_common: list[Pathway]


class PromptCacheCounts(BaseModel):
    hit: int
    miss: int
    prefetched: int


class TraceSummary(BaseModel):
    hits: int = Field(description="'hit' entries over all steps and layers of this trace.")
    misses: int = Field(description="'miss' entries over all steps and layers of this trace.")
    prefetched: int = Field(description="'prefetched' entries over all steps and layers of this trace.")
    loads: int = Field(description="Experts loaded for this request's tokens, prompt included "
                                   "(a load shared with co-batched requests counts for each).")
    load_seconds: float = Field(description="Time this request's forwards waited for expert loads.")
    regret: int = Field(description="Expert slots a lossy routing policy substituted in this request's forwards "
                                    "(shared with co-batched requests; 0 under exact routing).")
    prompt: PromptCacheCounts = Field(description="Cache outcomes of the prompt rows that were not steps.")
    pathways: PathwaySummary


class Trace(BaseModel):
    steps: list[TraceStep]
    summary: TraceSummary


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "text": " there was", "token_ids": [612, 574], "finish_reason": "length",
        "usage": {"prompt_tokens": 4, "completion_tokens": 2},
        "trace": {"steps": [{"token_id": 612, "text": " there", "layers": [
            {"layer": 0, "experts": [3, 17, 5, 30], "weights": [0.41, 0.27, 0.19, 0.13],
             "cache": ["hit", "miss", "hit", "hit"]}]}],
            "summary": {"hits": 3, "misses": 1, "prefetched": 0, "loads": 5, "load_seconds": 0.0021, "regret": 0,
                        "prompt": {"hit": 9, "miss": 3, "prefetched": 0},
                        "pathways": {"tokens": 1, "distinct": 1, "most_common": [{"experts": [3], "count": 1}]}}},
    }]})

    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    trace: Trace | None = None


# --- errors, ops --------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "message": "prompt (500 tokens) + max_new_tokens (64) = 564 exceeds the context window of 512 tokens",
        "type": "invalid_request_error", "param": "max_new_tokens", "code": "context_length_exceeded"}}]})

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed", "stopping", "stalled"]
    model: str | None = None
    detail: str | None = None
