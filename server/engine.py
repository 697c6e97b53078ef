"""The serving engine: admission, transformers' continuous batching, per-request streams.

Requests are decoded together by transformers' continuous-batching manager (paged KV
cache, FIFO scheduler, chunked prefill, one flat forward per step). cadre adds what the
HTTP layer needs around it:

- admission: at most `max_concurrency` requests in the batch, whose prompt + max_new_tokens
  pages fit in the memory plan's KV tokens together (so admitted requests always fit and
  the manager never has to preempt), `max_queue` waiting, 503 beyond;
- per-request sampling with its own generator (sampling.py);
- routing mapped back to requests from the batch layout (routing.py);
- detokenization, stop strings and cancellation, on the event loop;
- one release path (`_release`): however a request ends -- finished, stopped, cancelled,
  or failed while admitting, running or finishing -- it gives back its batch slot and KV
  pages, its sampler slot and its routing record, so no request can hurt the next;
- prompt scoring (`score`) outside the batch, while the batching loop is paused;
- a progress watch: `health_problem()` says when the loop died or stopped stepping.

The manager's thread runs the forwards and delivers each request's outputs to the event
loop (`register_result_handler`); everything else here runs on the loop, so the
engine's own bookkeeping needs no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from transformers import ContinuousBatchingConfig, GenerationConfig, LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList

from .detokenize import IncrementalDetokenizer, StopStrings
from .grammar import Grammars
from .logs import log_event
from .metrics import Metrics
from .routing import BatchSlot, RoutingRecorder
from .sampling import GREEDY_SLOT, SLOT_KWARG, PerRequestSampler, SamplerTable, SamplingParams, StepResult
from .scoring import prompt_logprobs
from .stream import RequestStream, TokenEvent
from .threads import in_passing_thread
from .vocab import Vocabulary

PAGE_SIZE = 64  # KV tokens per page: small pages waste little on short requests
MAX_BATCH_TOKENS = 512  # tokens per forward; longer prefills are chunked so decodes keep flowing
CANCEL_SLACK = 2  # batch rows for cancelled requests the manager has not dropped yet


@dataclass(frozen=True)
class EngineConfig:
    max_concurrency: int = 16
    max_queue: int = 64
    max_model_len: int = 512
    retry_after_s: int = 1
    stall_timeout_s: float = 60.0  # no step for this long while work is in flight: not ready
    # "auto": transformers' continuous batching where it supports the model's attention
    # (its warm-up generation succeeds), else the static batched path (static_batching.py)
    batching: str = "auto"  # auto | continuous | static
    kv_tokens: int | None = None  # KV tokens the running requests share (the memory plan's); None: each slot's
    #                               full max_model_len, as before the plan

    @property
    def kv_pages(self) -> int:
        if self.kv_tokens is None:
            return (self.max_concurrency + CANCEL_SLACK) * math.ceil(self.max_model_len / PAGE_SIZE)
        return math.ceil(self.kv_tokens / PAGE_SIZE)


class EngineUnavailable(Exception):
    """The engine cannot take a request now; `reason` labels cadre_request_rejections_total."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Engine:
    kind = "continuous-batching"

    def __init__(self, runtime, config: EngineConfig, metrics: Metrics):
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self.tokenizer = runtime.tokenizer
        self.eos_token_ids = eos_token_ids(runtime.model)
        self.vocab_size = runtime.model.get_output_embeddings().weight.shape[0]
        self.samplers = SamplerTable(self.vocab_size)
        self.vocabulary = Vocabulary(self.tokenizer, self.vocab_size)  # token texts for logprobs, built on first use
        self._grammars: Grammars | None = None
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
        self._kv_pages: dict[str, int] = {}  # running request -> KV pages reserved for its prompt + max_new_tokens
        self._idle = asyncio.Event()
        self._score_lock = threading.Lock()  # one scoring forward at a time (the pause admits several threads)
        self._scoring = 0  # scoring calls in flight (event loop)
        self._outside_batch_forward = False  # a scoring forward runs: its routing belongs to no batch request
        self._last_progress = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Build and start the batching manager (blocking; call off the event loop)."""
        if self.config.batching == "static":
            self._start_static("asked for (--batching static)")
            return
        attention = self.runtime.model.config._attn_implementation
        try:
            self._start_continuous()
        except ValueError as exc:
            # transformers refuses a model whose layers its paged cache has no allocator for
            # (linear attention, Mamba, indexed attention: Qwen3-Next, Jamba, HY-V4), having
            # switched the model to paged attention already: generate() needs its own back
            self.runtime.model.set_attn_implementation(attention)
            reason = f"continuous batching cannot page this model's layers ({str(exc)[:200]})"
            if self.config.batching != "auto":
                raise RuntimeError(f"--batching continuous: {reason}; --batching auto or static serves it") from exc
            self._start_static(reason)

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
        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            # the plan's KV; admission (_fits) keeps admitted requests within it: no preemption
            num_blocks=self.config.kv_pages,
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

    def health_problem(self) -> str | None:
        """Why the engine cannot make progress now (None: it can): what /ready reports."""
        if not self.is_alive:
            fatal = getattr(getattr(self.manager, "background_thread_status", None), "fatal_error", None)
            return "generation loop stopped" + (f": {fatal}" if fatal is not None else "")
        in_flight = len(self._running) + len(self._waiting) + self._scoring
        quiet = time.monotonic() - self._last_progress
        if in_flight and quiet > self.config.stall_timeout_s:
            return (f"no generation step completed in {quiet:.0f} s with {in_flight} requests in flight "
                    f"(stall timeout {self.config.stall_timeout_s:g} s)")
        return None

    def _note_progress(self) -> None:
        self._last_progress = time.monotonic()

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, give running ones `timeout` seconds, cancel the rest, stop. Never raises."""
        try:
            await self._drain(timeout)
            if self.manager is not None:
                await asyncio.to_thread(self.manager.stop, block=True, timeout=30)
                self.runtime.remove_routing_listener(self.recorder)
        except Exception as exc:  # noqa: BLE001 -- shutting down: say what went wrong, finish anyway
            log_event("shutdown_error", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")

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

    def check_capacity(self, streams: int = 1) -> None:
        """Raise EngineUnavailable unless `streams` more requests can be admitted now."""
        if not self.is_accepting:
            raise EngineUnavailable("shutting_down", "server is shutting down")
        if not self.is_alive:
            raise EngineUnavailable("not_ready", "generation loop is not running")
        free = (self.config.max_concurrency - len(self._running)) + (self.config.max_queue - len(self._waiting))
        if streams > free:
            raise EngineUnavailable("queue_full", f"server is at capacity ({self.config.max_concurrency} running, "
                                                  f"{self.config.max_queue} waiting); retry later")

    async def submit(self, prompt_ids: list[int], params: SamplingParams, trace: bool,
                     internal: bool = False) -> RequestStream:
        if not internal and not self.is_ready and self.is_accepting:
            raise EngineUnavailable("not_ready", "model is still loading")
        self.check_capacity()
        stream = RequestStream(request_id=f"cmpl-{next(self._ids)}", prompt_ids=list(prompt_ids), params=params,
                               trace=trace, detokenizer=IncrementalDetokenizer(self.tokenizer),
                               stops=StopStrings(params.stop), internal=internal)
        stream._engine = self
        if not internal:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        if not self._running and not self._waiting:
            self._note_progress()  # the stall clock starts when work arrives at an idle engine
        if not self._waiting and self._fits(stream):
            self._launch(stream)
        elif len(self._waiting) < self.config.max_queue:
            self._waiting.append(stream)
        else:  # a free slot, but not the KV pages it can reach: waits, if there is room to wait
            raise EngineUnavailable("queue_full", f"server is at capacity ({len(self._running)} running, KV pages "
                                                  f"for {self.config.kv_pages * PAGE_SIZE} tokens held); retry later")
        self._update_gauges()
        return stream

    def _fits(self, stream: RequestStream) -> bool:
        """A batch slot is free and the KV pages the request can reach are not reserved by others."""
        return (len(self._running) < self.config.max_concurrency
                and sum(self._kv_pages.values()) + kv_pages_of(stream) <= self.config.kv_pages)

    def _launch(self, stream: RequestStream) -> None:
        """Put a request in the batch; a failure on the way ends it (and frees what it took) at once."""
        rid = stream.request_id
        self._running[rid] = stream
        self._kv_pages[rid] = kv_pages_of(stream)
        try:
            self.recorder.register(rid, stream.trace)
            slot = self.samplers.register(stream.params, stream.prompt_ids, self.stop_token_ids(stream.params))
            self._sampler_slots[rid] = slot
            added = self._submit_to_compute(stream, slot)
        except Exception as exc:  # noqa: BLE001 -- e.g. a sampler that cannot be built: this request fails alone
            self._finish(stream, "error", error=f"{type(exc).__name__}: {exc}")
            return
        if not added:  # the manager is stopping or died
            self._finish(stream, "error", error="generation loop is not accepting requests")

    def _submit_to_compute(self, stream: RequestStream, sampler_slot: int) -> bool:
        """Hand a request to whatever runs the forwards: here transformers' manager."""
        rid = stream.request_id
        self.manager.register_result_handler(rid, lambda output, s=stream: self._on_output(s, output))
        added = self.manager.add_request(stream.prompt_ids, request_id=rid,
                                         max_new_tokens=stream.params.max_new_tokens, streaming=True,
                                         eos_token_id=self.stop_token_ids(stream.params) or -1,
                                         **{SLOT_KWARG: sampler_slot})
        return added is not None

    def _stop_generation(self, request_id: str, still_running: bool) -> None:
        """A request ended: stop its forwards if they would go on (stop string, cancel, a failure of
        ours), and drop the manager's handler for it (it keeps those of unfinished requests)."""
        if still_running:
            self.manager.cancel_request(request_id)  # its pages free at the loop's next step
        forget_result_handler(self.manager, request_id)

    def stop_token_ids(self, params: SamplingParams) -> list[int]:
        """Tokens that end this request: EOS (unless ignore_eos) and its stop_token_ids."""
        eos = [] if params.ignore_eos else self.eos_token_ids
        return list(dict.fromkeys([*eos, *params.stop_token_ids]))

    def _admit_waiting(self) -> None:
        while self._waiting and self._fits(self._waiting[0]):
            self._launch(self._waiting.popleft())
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.requests_running.set(sum(1 for s in self._running.values() if not s.internal))
        self.metrics.requests_waiting.set(len(self._waiting))

    # --- outputs (event loop) ------------------------------------------------------------------
    def _on_output(self, stream: RequestStream, output) -> None:
        self._note_progress()
        if stream.finished:
            return  # cancelled or stopped: late outputs of steps already in flight
        try:
            self._take_output(stream, output)
        except Exception as exc:  # noqa: BLE001 -- e.g. a detokenizer failure: this request fails alone
            self._finish(stream, "error", error=f"{type(exc).__name__}: {exc}")

    def _take_output(self, stream: RequestStream, output) -> None:
        if output.error is not None:
            self._finish(stream, "error", error=output.error, manager_done=True)
            return
        for token_id in output.generated_tokens[len(stream.token_ids):]:
            self._add_token(stream, token_id)
            if stream.finished:
                return
        if output.is_finished():
            last = stream.token_ids[-1] if stream.token_ids else None
            eos = last in self.eos_token_ids and not stream.params.ignore_eos
            reason = "eos" if eos else "stop" if last in stream.params.stop_token_ids else "length"
            self._finish(stream, reason, manager_done=True)

    def _add_token(self, stream: RequestStream, token_id: int) -> None:
        now = time.perf_counter()
        index = len(stream.token_ids)
        sampled = self.samplers.take(self._sampler_slots.get(stream.request_id, GREEDY_SLOT), index)
        if sampled is not None and sampled.error is not None:
            self._finish(stream, "error", error=f"sampling failed: {sampled.error}")
            return
        assert sampled is None or sampled.token_id == token_id, (sampled, token_id)
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
        stream.offsets.append(len(stream.detokenizer.text))
        piece = stream.detokenizer.add(token_id)
        stream.token_ids.append(token_id)
        if stream.params.logprobs is not None:
            stream.logprobs.append(sampled)
        # vLLM's min_tokens: no stop string may end the text before that many tokens
        stop_at = stream.stops.find(stream.detokenizer.text, len(piece)) \
            if len(stream.token_ids) >= stream.params.min_tokens else None
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
        if not stream.finished:
            self._finish(stream, "cancelled")

    def _finish(self, stream: RequestStream, reason: str, error: str | None = None,
                manager_done: bool = False) -> None:
        """End a request: `manager_done` when the manager ended it itself (length, eos, its own error)."""
        stream.finish_reason, stream.error = reason, error
        stream.finished_at = time.perf_counter()
        self._release(stream, manager_done)
        stream._events.put_nowait(None)
        stream._done.set()
        if not stream.internal:
            self.metrics.e2e_request_latency.observe(stream.finished_at - stream.arrived)
        self._admit_waiting()
        if not self._running:
            self._idle.set()

    def _release(self, stream: RequestStream, manager_done: bool) -> None:
        """The one path that gives back what a request holds -- its batch slot and KV pages (the
        manager's), its sampler slot, its routing record -- whatever stage it reached."""
        rid = stream.request_id
        self._kv_pages.pop(rid, None)
        if self._running.pop(rid, None) is None:
            if stream in self._waiting:
                self._waiting.remove(stream)
            return
        self._stop_generation(rid, still_running=not manager_done)
        self.samplers.release(self._sampler_slots.pop(rid, GREEDY_SLOT))
        stream.routing = self.recorder.release(rid)

    # --- prompt scoring --------------------------------------------------------------------------
    async def score(self, prompt_ids: list[int], top_n: int) -> list[StepResult | None]:
        """Logprobs of every prompt token (and its top_n alternatives): one forward outside the batch."""
        self.check_capacity(0)
        self._scoring += 1
        try:
            return await self._outside_batch(lambda: prompt_logprobs(self.runtime.model, list(prompt_ids), top_n,
                                                                     self.runtime.device))
        except RuntimeError as exc:  # the loop stopped before it could pause
            raise EngineUnavailable("not_ready", f"generation loop is not running ({exc})") from None
        finally:
            self._scoring -= 1
            self._note_progress()

    async def _outside_batch(self, fn):
        """fn() with the model to itself, between two batch steps: here in a passing thread while
        transformers' manager holds its loop paused (its public pause()), one call at a time."""
        def paused():
            with self._score_lock, self.manager.pause():
                self._outside_batch_forward = True  # its routing counts as usage, maps to no request
                try:
                    return fn()
                finally:
                    self._outside_batch_forward = False
        return await in_passing_thread(paused)

    @property
    def grammars(self) -> Grammars:
        """Constrained decoding's compiled indexes over this model's vocabulary (needs a tokenizer and EOS)."""
        if self._grammars is None:
            assert self.tokenizer is not None and self.eos_token_ids
            self._grammars = Grammars(self.vocabulary.token_bytes, set(self.tokenizer.all_special_ids),
                                      self.eos_token_ids[0])
        return self._grammars

    # --- compute thread ------------------------------------------------------------------------
    def _batch_layout(self) -> list[BatchSlot]:
        """Rows of each request in the forward running now (called inside that forward)."""
        if self._outside_batch_forward:
            return []
        if self.batching == "static":
            return self.manager.batch_layout()
        io = self.manager.batch_processor.inputs_and_outputs
        batch = io.requests_in_batch
        cu = io.cumulative_seqlens_q[: len(batch) + 1].tolist()
        return [BatchSlot(fs.state.request_id, cu[i], cu[i + 1], fs.state.generated_len() if fs.has_new_token else None)
                for i, fs in enumerate(batch)]

    def store_available(self) -> bool:
        """False once the expert store's files are gone (a failed load then means 503, not 500)."""
        root = getattr(self.runtime.store, "root", None)
        return root is None or (root / "manifest.json").is_file()

    def kv_pages_in_use(self) -> int:
        """KV-cache pages held by requests (0 when idle: a leak check). Reads the manager's
        allocators' block tables, which transformers does not document as public."""
        if hasattr(self.manager, "rows_held"):  # the static batched path: one cache per batch row
            return self.manager.rows_held()
        processor = getattr(self.manager, "batch_processor", None)
        if processor is None:
            return 0
        return sum(len(table) for allocator in processor.cache.cache_allocators.values()
                   for table in list(allocator.block_table.values()))


def kv_pages_of(stream: RequestStream) -> int:
    """KV pages a request can reach: its prompt and every token it may generate."""
    return math.ceil((len(stream.prompt_ids) + stream.params.max_new_tokens) / PAGE_SIZE)


def eos_token_ids(model) -> list[int]:
    """EOS ids from the generation config (what generate() stops on), else the model config."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def forget_result_handler(manager, request_id: str) -> None:
    """Drop an ended request's output handler: the manager only removes handlers of requests
    that finish, and a cancelled one never does (no public API for this). Outputs of steps
    still in flight then land in the manager's shared output queue, which nothing else
    reads: drop those too, so they cannot pile up."""
    if hasattr(manager, "forget"):  # the static batched path's own manager
        manager.forget(request_id)
        return
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)
    while True:
        try:
            router.output_queue.get_nowait()
        except queue.Empty:
            return
