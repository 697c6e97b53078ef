"""One request as the HTTP layer sees it: token events as they come, then how it ended."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .detokenize import IncrementalDetokenizer, StopStrings
from .logs import log_event
from .routing import RequestRouting
from .sampling import SamplingParams, StepResult

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token_id: int
    text: str  # what this token adds to the text (may be empty: an incomplete character)
    layers: list[dict] | None  # routing of the forward that produced it (trace only)


@dataclass
class RequestStream:
    """One request as the HTTP layer sees it: token events, then a finish reason."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    trace: bool
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    internal: bool = False  # warm-up: no request metrics, no log line
    token_ids: list[int] = field(default_factory=list)
    steps: list[TokenEvent] = field(default_factory=list)  # kept when tracing
    logprobs: list[StepResult] = field(default_factory=list)  # per token, when params.logprobs is set
    offsets: list[int] = field(default_factory=list)  # per token: where its text starts in the full text
    text: str = ""
    finish_reason: str | None = None  # length | stop | eos | cancelled | error
    error: str | None = None
    outcomes: Counter = field(default_factory=Counter)  # cache outcomes of the returned tokens' steps
    routing: RequestRouting | None = None  # per-forward totals, set when the request ends
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    _events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _engine: "Engine | None" = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    async def events(self):
        """Token events as they are generated; ends when the request finishes."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    async def result(self) -> "RequestStream":
        await self._done.wait()
        return self

    def cancel(self) -> None:
        """Stop generating (client went away); frees the batch slot now."""
        if not self.finished and self._engine is not None:
            self._engine.cancel(self)


def routing_counts(stream: RequestStream) -> dict:
    """A request's cache story: outcomes of its returned tokens, loads and waits of its forwards."""
    record = stream.routing or RequestRouting(trace=stream.trace)
    return {
        "hits": stream.outcomes["hit"],
        "misses": stream.outcomes["miss"],
        "prefetched": stream.outcomes["prefetched"],
        "loads": record.loads,
        "load_seconds": round(record.load_seconds, 6),
        "regret": record.regret,
        "prompt": {k: record.prompt_outcomes[k] for k in ("hit", "miss", "prefetched")},
    }


def log_request(stream: RequestStream, endpoint: str) -> None:
    """One line per request: id, tokens, latency, cache hits/misses."""
    counts = routing_counts(stream)
    end = stream.finished_at or time.perf_counter()
    log_event("request", level=logging.INFO if stream.finish_reason != "error" else logging.ERROR,
              id=stream.request_id, endpoint=endpoint, finish_reason=stream.finish_reason,
              prompt_tokens=len(stream.prompt_ids), completion_tokens=len(stream.token_ids),
              latency_s=round(end - stream.arrived, 4),
              ttft_s=round(stream.first_token_at - stream.arrived, 4) if stream.first_token_at else None,
              hits=counts.get("hits"), misses=counts.get("misses"), loads=counts.get("loads"), error=stream.error)
