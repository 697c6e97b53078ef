"""Request and response bodies (pydantic at the HTTP edge; shapes: shared/DESIGN.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4


# --- /generate -------------------------------------------------------------------------------

class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_new_tokens": 32, "temperature": 0, "trace": True},
        {"prompt": "The cache", "max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "seed": 7,
         "stop": ["\n"], "stream": True},
    ]})

    prompt: str = Field(min_length=1, description="Text to continue.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter.")
    seed: int | None = Field(None, ge=0, description="Same seed + same request -> same text.")
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


# --- OpenAI-compatible -------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata, ...)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="Extension (as in vLLM): 0 = no top-k filter.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    seed: int | None = Field(None, ge=0)
    stop: list[str] | str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, description="Not supported: must be 0.")
    frequency_penalty: float = Field(0.0, description="Not supported: must be 0.")
    logprobs: bool | int | None = Field(None, description="Not supported.")

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first parameter set to something cadre does not implement."""
        checks = [("n", self.n == 1, "n > 1 is not supported"),
                  ("presence_penalty", self.presence_penalty == 0, "presence_penalty is not supported (must be 0)"),
                  ("frequency_penalty", self.frequency_penalty == 0, "frequency_penalty is not supported (must be 0)"),
                  ("logprobs", not self.logprobs, "logprobs are not supported")]
        return next(((param, msg) for param, ok, msg in checks if not ok), None)


class CompletionRequest(OpenAISampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "cadre-demo", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0},
    ]})

    prompt: str | list[int] = Field(description="Text, or token ids.")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="Not supported: must be false.")

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        return super().unsupported()


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(OpenAISampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "cadre-demo", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context window.")
    max_completion_tokens: int | None = Field(None, ge=1)


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cadre"
    max_model_len: int
    # "continuous" (transformers' continuous batching) or "static" (its generate(), batched:
    # for attention continuous batching cannot page, e.g. DeepSeek's MLA)
    batching: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
    status: Literal["ready", "loading", "failed", "stopping"]
    model: str | None = None
    detail: str | None = None
