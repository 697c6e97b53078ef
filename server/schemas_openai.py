"""OpenAI-compatible request and response bodies (/v1/completions, /v1/chat/completions).

Every parameter accepted here does what OpenAI documents (or, for the extensions marked
so, what vLLM documents); any other field is a 400 naming it, never silently ignored. A
`null` value means the parameter's default, as OpenAI's API treats it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .schemas import MAX_SEED, STRICT

MAX_CHOICES = 16  # n and best_of
MAX_LOGPROBS = 20  # alternatives per token (OpenAI allows 5 on completions, 20 on chat; vLLM 20)
PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


class StrictBody(BaseModel):
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or cls.model_fields.get(k) is None
                    or cls.model_fields[k].is_required()}
        return data


class StreamOptions(StrictBody):
    include_usage: bool = Field(False, description="A last chunk with no choices and the request's usage.")
    continuous_usage_stats: bool = Field(False, description="Extension (vLLM): usage so far in every chunk.")


class OpenAISampling(StrictBody):
    """Parameters shared by both endpoints (OpenAI's names and defaults)."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Choice i samples with seed + i.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the text (not included).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    user: str | None = Field(None, description="End-user id: written to the request's log line.")
    # Extensions, with vLLM's names and meanings
    top_k: int = Field(0, ge=0, description="Extension: 0 = no top-k filter.")
    min_tokens: int = Field(0, ge=0, description="Extension: EOS and stop_token_ids are banned before this many "
                                                 "tokens, and stop strings not looked for.")
    ignore_eos: bool = Field(False, description="Extension: generate exactly max_tokens, EOS included as a token.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False,
                                      description="Extension: > 1 discourages tokens of the prompt and output.")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="Extension: tokens that end the output.")

    @field_validator("logit_bias")
    @classmethod
    def bias_in_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {value} for token {key}")
        return bias


class CompletionRequest(OpenAISampling):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [
        {"model": "cadre-demo", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0},
        {"model": "cadre-demo", "prompt": [[464, 2068, 1010]], "max_tokens": 1, "echo": True, "logprobs": 1,
         "temperature": 0},
    ]})

    prompt: str | list[str] | list[int] | list[list[int]] = Field(description=PROMPT_SHAPES.capitalize() + ".")
    max_tokens: int = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing.")
    echo: bool = Field(False, description="Prefix the choice with its prompt (and its tokens' logprobs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Logprob of each token and of the N most likely alternatives.")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES,
                                description="Generate best_of per prompt, return the n with the highest "
                                            "mean token logprob.")
    suffix: str | None = Field(None, description="Not supported (insertion): must be null.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def prompt_shape(cls, value, handler):
        try:
            prompt = handler(value)
        except ValidationError:
            raise ValueError(f"must be {PROMPT_SHAPES}") from None
        if isinstance(prompt, list) and not prompt:
            raise ValueError("must not be an empty list")
        return prompt


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = Field(None, description="The author's name, given to the chat template (or the transcript).")


class JSONSchemaFormat(StrictBody):
    name: str
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(OpenAISampling):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [
        {"model": "cadre-demo", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context window.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Logprob of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="With logprobs: N alternatives per token.")
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = Field(None, description="Not supported: must be empty.")
    tool_choice: str | dict | None = Field(None, description="Only 'none'.")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    usage: OpenAIUsage | None = Field(None, description="Extension: this choice's own usage.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    usage: OpenAIUsage | None = Field(None, description="Extension: this choice's own usage.")


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
