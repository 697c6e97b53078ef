"""The serving engine: admission, transformers' continuous batching, per-request streams.

Requests are decoded together by transformers' continuous-batching manager (paged KV
cache, FIFO scheduler, chunked prefill, one flat forward per step). cadre adds what the
HTTP layer needs around it:

- admission: at most `max_concurrency` requests in the batch, `max_queue` waiting for a
  slot, 503 beyond (the KV cache is sized so admitted requests always fit, so the
  manager never has to preempt);
- per-request sampling with its own generator (sampling.py);
- routing mapped back to requests from the batch layout (routing.py);
- detokenization, stop strings and cancellation, on the event loop.

The manager's thread runs the forwards and delivers each request's outputs to the event
loop (`register_result_handler`); everything else here runs on the loop, so the
engine's own bookkeeping needs no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from transformers import ContinuousBatchingConfig, GenerationConfig, LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList

from .detokenize import IncrementalDetokenizer, StopStrings
from .logs import log_event
from .metrics import Metrics
from .routing import BatchSlot, RequestRouting, RoutingRecorder
from .sampling import SLOT_KWARG, PerRequestSampler, SamplerTable, SamplingParams

PAGE_SIZE = 64  # KV tokens per page: small pages waste little on short requests
MAX_BATCH_TOKENS = 512  # tokens per forward; longer prefills are chunked so decodes keep flowing
CANCEL_SLACK = 2  # batch rows for cancelled requests the manager has not dropped yet


@dataclass(frozen=True)
class EngineConfig:
    max_concurrency: int = 16
    max_queue: int = 64
    max_model_len: int = 512
    retry_after_s: int = 1
    # "auto": transformers' continuous batching where it supports the model's attention
    # (its warm-up generation succeeds), else the static batched path (static_batching.py)
    batching: str = "auto"  # auto | continuous | static


class EngineUnavailable(Exception):
    """The engine cannot take a request now; `reason` labels cadre_request_rejections_total."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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


class Engine:
    kind = "continuous-batching"

    def __init__(self, runtime, config: EngineConfig, metrics: Metrics):
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self.tokenizer = runtime.tokenizer
        self.eos_token_ids = eos_token_ids(runtime.model)
        self.samplers = SamplerTable()
        policy = getattr(runtime, "policy", None)
        self.recorder = RoutingRecorder(runtime.store.moe_layers, runtime.store.num_experts, self._batch_layout,
                                        substitutions=lambda: int(getattr(policy, "regret", 0)))
        self.manager = None
        self.batching: str | None = None  # "continuous" | "static", once started
        self.batching_reason = ""
        self.is_ready = False
        self.is_accepting = True
        self._ids = itertools.count()
        self._running: dict[str, RequestStream] = {}
        self._waiting: deque[RequestStream] = deque()
        self._sampler_slots: dict[str, int] = {}
        self._idle = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Build and start the batching manager (blocking; call off the event loop)."""
        if self.config.batching == "static":
            self._start_static("asked for (--batching static)")
        else:
            self._start_continuous()

    def _start_static(self, reason: str) -> None:
        from .static_batching import StaticBatchingManager

        pad = getattr(self.runtime.model.generation_config, "pad_token_id", None)
        self.manager = StaticBatchingManager(self.runtime.model, self.samplers, self.config.max_concurrency,
                                             pad_token_id=pad if isinstance(pad, int) else 0)
        self.batching, self.batching_reason = "static", reason
        self.runtime.add_routing_listener(self.recorder)
        self.manager.start()

    def _start_continuous(self) -> None:
        model = self.runtime.model
        max_requests = self.config.max_concurrency + CANCEL_SLACK
        pages_per_request = math.ceil(self.config.max_model_len / PAGE_SIZE)
        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=max_requests * pages_per_request,  # every admitted request fits: no preemption
            max_batch_tokens=MAX_BATCH_TOKENS,
            max_requests_per_batch=max_requests,
            # Routing listeners and on-demand expert loads are Python, run inside the forward:
            # CUDA graphs would replay without them, and async batching would prepare the next
            # batch while this one's routing is being mapped to its requests.
            use_cuda_graph=False,
            use_async_batching=False,
            auto_switch_to_flash=False,
        )
        generation_config = GenerationConfig(do_sample=False, max_new_tokens=self.config.max_model_len,
                                             eos_token_id=self.eos_token_ids or -1)
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=cb_config)
        # Continuous batching has no public hook for an extra per-request processor; its
        # processor list is built from the generation config, which has none: replace it
        # before the batch processor (created when the manager starts) reads it.
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([PerRequestSampler(self.samplers)]))
        processors.tensors_required = 1  # transformers counts only the processors it converts itself
        self.manager.logit_processor = processors
        self.batching, self.batching_reason = "continuous", "transformers' continuous batching"
        self.runtime.add_routing_listener(self.recorder)
        self.manager.start()

    async def warmup(self) -> None:
        """One short greedy request through the whole path (first forwards allocate and load).

        With batching "auto", a continuous batch that cannot run the model's attention fails
        here, on its first forward: the engine then switches to the static batched path and
        warms that up instead, and says so in the log and /v1/models."""
        error = await self._warmup_request()
        if error is not None and self.batching == "continuous" and self.config.batching == "auto":
            await asyncio.to_thread(self.manager.stop, block=True, timeout=30)
            self.runtime.remove_routing_listener(self.recorder)
            self._start_static(f"continuous batching cannot run this model's attention ({error[:200]})")
            error = await self._warmup_request()
        if error is not None:
            raise RuntimeError(f"warm-up generation failed: {error}")
        log_event("batching", mode=self.batching, reason=self.batching_reason)
        self.is_ready = True

    async def _warmup_request(self) -> str | None:
        prompt = self.tokenizer("Hello", add_special_tokens=True)["input_ids"] if self.tokenizer else [0]
        stream = await self.submit(prompt, SamplingParams(max_new_tokens=2), trace=False, internal=True)
        await stream.result()
        if stream.finish_reason == "error":
            return stream.error or "unknown error"
        return None

    @property
    def is_alive(self) -> bool:
        return self.manager is not None and self.manager.is_running()

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, give running ones `timeout` seconds, cancel the rest, stop."""
        await self._drain(timeout)
        if self.manager is not None:
            await asyncio.to_thread(self.manager.stop, block=True, timeout=30)
            self.runtime.remove_routing_listener(self.recorder)

    async def _drain(self, timeout: float) -> None:
        self.is_accepting = False
        for stream in list(self._waiting):
            self.cancel(stream)
        if self._running:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for stream in list(self._running.values()):
            self.cancel(stream)

    # --- admission ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def submit(self, prompt_ids: list[int], params: SamplingParams, trace: bool,
                     internal: bool = False) -> RequestStream:
        if not self.is_accepting:
            raise EngineUnavailable("shutting_down", "server is shutting down")
        if not internal and not self.is_ready:
            raise EngineUnavailable("not_ready", "model is still loading")
        if not self.is_alive:
            raise EngineUnavailable("not_ready", "generation loop is not running")
        if len(self._running) >= self.config.max_concurrency and len(self._waiting) >= self.config.max_queue:
            raise EngineUnavailable("queue_full", f"server is at capacity ({self.config.max_concurrency} running, "
                                                  f"{self.config.max_queue} waiting); retry later")
        stream = RequestStream(request_id=f"cmpl-{next(self._ids)}", prompt_ids=list(prompt_ids), params=params,
                               trace=trace, detokenizer=IncrementalDetokenizer(self.tokenizer),
                               stops=StopStrings(params.stop), internal=internal)
        stream._engine = self
        if not internal:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        if len(self._running) < self.config.max_concurrency:
            self._launch(stream)
        else:
            self._waiting.append(stream)
        self._update_gauges()
        return stream

    def _launch(self, stream: RequestStream) -> None:
        rid = stream.request_id
        self._running[rid] = stream
        self.recorder.register(rid, stream.trace)
        slot = self.samplers.register(stream.params)
        self._sampler_slots[rid] = slot
        if not self._submit_to_compute(stream, slot):  # the manager is stopping or died
            self._finish(stream, "error", error="generation loop is not accepting requests")

    def _submit_to_compute(self, stream: RequestStream, sampler_slot: int) -> bool:
        """Hand a request to whatever runs the forwards: here transformers' manager."""
        rid = stream.request_id
        self.manager.register_result_handler(rid, lambda output, s=stream: self._on_output(s, output))
        added = self.manager.add_request(stream.prompt_ids, request_id=rid,
                                         max_new_tokens=stream.params.max_new_tokens, streaming=True,
                                         eos_token_id=self.eos_token_ids or -1, **{SLOT_KWARG: sampler_slot})
        return added is not None

    def _stop_generation(self, request_id: str) -> None:
        """The forwards of a request that ended early (stop string, cancel) stop here too."""
        self.manager.cancel_request(request_id)
        forget_result_handler(self.manager, request_id)

    def _admit_waiting(self) -> None:
        while self._waiting and len(self._running) < self.config.max_concurrency:
            self._launch(self._waiting.popleft())
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.requests_running.set(sum(1 for s in self._running.values() if not s.internal))
        self.metrics.requests_waiting.set(len(self._waiting))

    # --- outputs (event loop) ------------------------------------------------------------------
    def _on_output(self, stream: RequestStream, output) -> None:
        if stream.finished:
            return  # cancelled or stopped: late outputs of steps already in flight
        if output.error is not None:
            self._finish(stream, "error", error=output.error)
            return
        for token_id in output.generated_tokens[len(stream.token_ids):]:
            self._add_token(stream, token_id)
            if stream.finished:
                return
        if output.is_finished():
            last = stream.token_ids[-1] if stream.token_ids else None
            self._finish(stream, "eos" if last in self.eos_token_ids else "length")

    def _add_token(self, stream: RequestStream, token_id: int) -> None:
        now = time.perf_counter()
        index = len(stream.token_ids)
        if not stream.internal:
            if stream.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - stream.arrived)
            else:
                self.metrics.inter_token_latency.observe(now - stream.last_token_at)
            self.metrics.generation_tokens.inc()
        stream.first_token_at = stream.first_token_at or now
        stream.last_token_at = now
        step = self.recorder.take_step(stream.request_id, index)
        stream.outcomes.update(step.outcomes)
        piece = stream.detokenizer.add(token_id)
        stream.token_ids.append(token_id)
        stop_at = stream.stops.find(stream.detokenizer.text, len(piece))
        stream.text = stream.detokenizer.text if stop_at is None else stream.detokenizer.text[:stop_at]
        event = TokenEvent(index, token_id, piece, step.layers)
        if stream.trace:
            stream.steps.append(event)
        stream._events.put_nowait(event)
        if stop_at is not None:
            self._finish(stream, "stop")

    def stable_text(self, stream: RequestStream) -> str:
        """Text that no stop string can still claim (what a text stream may send now)."""
        if stream.finished:
            return stream.text
        return stream.text[: stream.stops.stable_length(stream.text)]

    # --- endings -----------------------------------------------------------------------------------
    def cancel(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        if stream.request_id not in self._running:
            self._waiting.remove(stream)
        self._finish(stream, "cancelled")

    def _finish(self, stream: RequestStream, reason: str, error: str | None = None) -> None:
        stream.finish_reason, stream.error = reason, error
        stream.finished_at = time.perf_counter()
        rid = stream.request_id
        if self._running.pop(rid, None) is not None:
            if reason in ("stop", "cancelled"):  # the forwards would keep generating: end them there too
                self._stop_generation(rid)
            self.samplers.release(self._sampler_slots.pop(rid))
            stream.routing = self.recorder.release(rid)
        stream._events.put_nowait(None)
        stream._done.set()
        if not stream.internal:
            self.metrics.e2e_request_latency.observe(stream.finished_at - stream.arrived)
        self._admit_waiting()
        if not self._running:
            self._idle.set()

    # --- compute thread ------------------------------------------------------------------------
    def _batch_layout(self) -> list[BatchSlot]:
        """Rows of each request in the forward running now (called inside that forward)."""
        if self.batching == "static":
            return self.manager.batch_layout()
        io = self.manager.batch_processor.inputs_and_outputs
        batch = io.requests_in_batch
        cu = io.cumulative_seqlens_q[: len(batch) + 1].tolist()
        return [BatchSlot(fs.state.request_id, cu[i], cu[i + 1], fs.state.generated_len() if fs.has_new_token else None)
                for i, fs in enumerate(batch)]


def eos_token_ids(model) -> list[int]:
    """EOS ids from the generation config (what generate() stops on), else the model config."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def forget_result_handler(manager, request_id: str) -> None:
    """Drop a cancelled request's output handler: the manager only removes handlers of
    requests that finish, and a cancelled one never does (no public API for this)."""
    if hasattr(manager, "forget"):  # the static batched path's own manager
        manager.forget(request_id)
        return
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


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
