"""The serving engine on cadre's slot-cache decoder: decode steps replayed from CUDA graphs.

Measured on an H200 (bench decode, README): transformers' continuous batching gives 127-170
tok/s for 16 prompts of the 8-layer Qwen3-30B-A3B slice, while a decode step captured as a
CUDA graph gives ~400 tok/s for one. So on CUDA the server schedules requests itself, the
way nano-vllm does: each admitted request owns a row of the decoder's slot KV cache; the
compute thread prefills the rows of the requests that arrived together (in one forward per
chunk, so they share each layer's expert loads), then runs one decode step for every active row, padded
to the next captured batch size, and samples each row with its request's own sampler.
Admission, queueing, cancellation, stop strings, traces and metrics are the Engine's
(server/engine.py): this class replaces only what ran inside transformers' manager.

Decode steps of greedy rows are pipelined, as vLLM's async scheduling and SGLang's overlap
scheduler do: the compute thread queues step N+1, fed on the device by step N's argmax, and
only then reads step N's tokens, emits its routing and hands its outputs to the event loop,
while the GPU runs step N+1. The host's per-token work (routing accounting, delivery, the
event loop's share of the GIL) then overlaps the GPU instead of adding to it. The price is
one step decoded past an EOS or a cancellation, and dropped; a row whose last token is
queued is left out of the next step, so max_new_tokens costs nothing extra. A step with a
row that samples (a request with a sampler: temperature, penalties, logprobs, a grammar)
runs synchronously, as prefill does: its tokens are chosen on the host.

Compute thread: owns the decoder, its rows and the per-row sequences; it talks to the event
loop only through a command queue (in) and `call_soon_threadsafe` (out).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from models.decoder import copy_to_host_behind

from .engine import Engine
from .logs import log_event
from .routing import BatchSlot
from .sampling import GREEDY_SLOT

STOP = object()


@dataclass
class _Output:
    """What the Engine's output handler reads (continuous batching's output, in short)."""

    generated_tokens: list[int]
    finished: bool = False
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class _Sequence:
    request_id: str
    stream: object
    prompt: list[int]
    max_new_tokens: int
    sampler_slot: int
    stops: frozenset[int]  # EOS (unless ignore_eos) and the request's stop_token_ids
    row: int = -1
    tokens: list[int] = field(default_factory=list)
    issued: int = 0  # tokens generated or on their way: len(tokens), + 1 while a pipelined step runs

    @property
    def last(self) -> int:
        return self.tokens[-1]


@dataclass
class _QueuedStep:
    """A pipelined decode step on the device whose tokens the host has not read yet."""

    batch: list[_Sequence]
    layout: list[BatchSlot]
    tokens: torch.Tensor  # [batch size] by row, host (pinned on CUDA): valid once `ready` has passed
    ready: torch.cuda.Event | None
    emit_routing: Callable[[], None] | None  # Decoder.take_routing's


class DecoderEngine(Engine):
    """Engine whose forwards run on `runtime.decoder` (models/decoder.py)."""

    kind = "decoder"

    # Pipelined decode steps (module docstring): on CUDA, where the device runs ahead of the host.
    # On CPU the host computes the step itself, so there is nothing to overlap (tests set it).
    pipeline: bool | None = None

    def start(self) -> None:
        self.decoder = self.runtime.decoder(max_batch=self.config.max_concurrency,
                                            max_len=self.config.max_model_len)
        captured = self.decoder.capture_all()  # before the first request, as vLLM does
        if self.pipeline is None:
            self.pipeline = self.decoder.device.type == "cuda"
        self.decoder.defer_routing = self.pipeline
        # each row's last token on the device: what a pipelined step feeds its rows
        self._next_tokens = torch.zeros(self.config.max_concurrency, dtype=torch.long, device=self.decoder.device)
        self._queued: _QueuedStep | None = None
        log_event("decoder", graphs=self.decoder.use_graphs, captured_steps=captured, pipelined=self.pipeline,
                  max_batch=self.config.max_concurrency, max_len=self.config.max_model_len)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._layout: list[BatchSlot] = []
        self.runtime.add_routing_listener(self.recorder)
        self._alive = True
        self._rows_held = 0  # written by the compute thread, read by /metrics
        self._thread = threading.Thread(target=self._run, name="cadre-decoder", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return getattr(self, "_thread", None) is not None and self._thread.is_alive() and self._alive

    async def shutdown(self, timeout: float) -> None:
        await self._drain(timeout)
        if getattr(self, "_thread", None) is not None:
            self._commands.put(STOP)
            await asyncio.to_thread(self._thread.join, 30)
            self.runtime.remove_routing_listener(self.recorder)

    # --- event loop side ----------------------------------------------------------------------
    def _submit_to_compute(self, stream, sampler_slot: int) -> bool:
        self._event_loop = asyncio.get_running_loop()  # where outputs go (submit runs on the loop)
        self._commands.put(_Sequence(stream.request_id, stream, list(stream.prompt_ids),
                                     stream.params.max_new_tokens, sampler_slot,
                                     frozenset(self.stop_token_ids(stream.params))))
        return True

    def _stop_generation(self, request_id: str, still_running: bool) -> None:
        if still_running:
            self._commands.put(("cancel", request_id))

    async def _outside_batch(self, fn):
        """fn() on the compute thread between two steps (it owns the model), its result awaited here."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, future, asyncio.get_running_loop()))
        return await future

    def kv_pages_in_use(self) -> int:
        """Decoder rows (each a request's slot KV cache) held by requests."""
        return self._rows_held if getattr(self, "_thread", None) is not None else 0

    def _batch_layout(self) -> list[BatchSlot]:
        return self._layout

    # --- compute thread -----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        rows: dict[int, _Sequence] = {}
        # A heap: a new request takes the lowest free row. A step decodes every row below its
        # highest (padded to a captured batch size), so a lone request after a burst that ended
        # out of order would otherwise decode as a batch of up to max_concurrency, its padding
        # rows routed and computed.
        free = list(range(self.config.max_concurrency))
        try:
            while True:
                admitted = []
                for command in self._next_commands(block=not rows and self._queued is None):
                    if command is STOP:
                        self._complete_queued(rows, free)
                        return
                    if isinstance(command, tuple) and command[0] == "call":
                        self._complete_queued(rows, free)  # the call's forward and routing come after
                        self._call_outside_batch(*command[1:])
                        continue
                    if isinstance(command, tuple):  # ("cancel", request_id)
                        self._drop(rows, free, command[1])
                        continue
                    command.row = heapq.heappop(free)
                    rows[command.row] = command
                    self._rows_held = len(rows)
                    admitted.append(command)
                # the requests that arrived together are prefilled together (sharing each layer's loads)
                admitted = [seq for seq in admitted if rows.get(seq.row) is seq]  # not cancelled meanwhile
                if admitted:
                    self._complete_queued(rows, free)  # a prefill samples on the host: the device is drained anyway
                    self._step(rows, free, admitted, prefill=True)
                if rows:
                    self._decode(rows, free)
                else:
                    self._complete_queued(rows, free)
        except BaseException as exc:  # the loop is gone: say why, fail what it held
            self._alive = False
            log_event("engine_failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            for seq in rows.values():
                self._deliver(seq, _Output(list(seq.tokens), True, f"generation loop failed: {exc}"))

    def _next_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _decode(self, rows: dict[int, _Sequence], free: list[int]) -> None:
        """One decode step of every row that still has a token to generate: queued behind the
        last one when every row is greedy (then the last one's tokens are read), else run
        synchronously once the last one is read."""
        batch = self._decodable(rows)
        if self.pipeline and batch and all(seq.sampler_slot == GREEDY_SLOT for seq in batch):
            previous, self._queued = self._queued, self._queue_step(rows, free, batch)
            self._complete(rows, free, previous)  # while the device runs the step just queued
            return
        self._complete_queued(rows, free)
        batch = self._decodable(rows)
        if batch:
            self._step(rows, free, batch, prefill=False)

    @staticmethod
    def _decodable(rows: dict[int, _Sequence]) -> list[_Sequence]:
        """The rows with a token still to generate (a row whose last token is queued waits for it), by row."""
        return sorted((seq for seq in rows.values() if seq.issued < seq.max_new_tokens), key=lambda s: s.row)

    def _queue_step(self, rows, free, batch: list[_Sequence]) -> _QueuedStep | None:
        """Queue one step of `batch` (every row greedy) fed from the device; None if it failed."""
        layout = self._decode_layout(batch)
        self._layout = layout  # an uncaptured step emits its routing as it runs
        try:
            logits = self.decoder.decode_queued([s.row for s in batch], self._next_tokens)  # [b,V] by row
        except Exception as exc:  # this step failed: fail its requests, keep serving the others
            self._fail_step(rows, free, batch, exc)
            return None
        chosen = logits.argmax(dim=-1)  # [b]
        self._next_tokens[:chosen.shape[0]].copy_(chosen)
        for seq in batch:
            seq.issued += 1
        tokens, ready = copy_to_host_behind(chosen)
        return _QueuedStep(batch, layout, tokens, ready, self.decoder.take_routing())

    @staticmethod
    def _decode_layout(batch: list[_Sequence]) -> list[BatchSlot]:
        """Each row's place in a decode step and the index of the token the step makes for it
        (`issued`: len(tokens) in a synchronous step, + 1 behind a queued one)."""
        return [BatchSlot(s.request_id, s.row, s.row + 1, s.issued) for s in batch]

    def _complete_queued(self, rows, free) -> None:
        queued, self._queued = self._queued, None
        self._complete(rows, free, queued)

    def _complete(self, rows, free, queued: _QueuedStep | None) -> None:
        """Read a pipelined step's tokens: its routing, then each row's token, as a synchronous step's."""
        if queued is None:
            return
        if queued.ready is not None:
            queued.ready.synchronize()
        if queued.emit_routing is not None:
            self._layout = queued.layout
            queued.emit_routing()
        tokens = queued.tokens.tolist()
        for seq in queued.batch:
            if rows.get(seq.row) is seq:  # not finished by an EOS, nor cancelled, since it was queued
                self._append(rows, free, seq, tokens[seq.row])

    def _step(self, rows: dict[int, _Sequence], free: list[int], batch: list[_Sequence], prefill: bool) -> None:
        try:
            if prefill:
                batch = self._fail_unfit(rows, free, batch)
                if not batch:
                    return
                logits = self.decoder.prefill_rows({s.row: s.prompt for s in batch}, self._prefill_layout(batch))
            else:
                self._layout = self._decode_layout(batch)
                logits = self.decoder.decode({s.row: s.last for s in batch})  # [B,V] in row order
                emit_routing = self.decoder.take_routing()
                if emit_routing is not None:
                    emit_routing()
        except Exception as exc:  # this step failed: fail its requests, keep serving the others
            self._fail_step(rows, free, batch, exc)
            return
        tokens = self._sample(batch, logits)
        if self.pipeline:  # the rows' next pipelined step reads its tokens on the device
            self._next_tokens.index_copy_(0, torch.tensor([s.row for s in batch]).to(self._next_tokens.device),
                                          torch.tensor(tokens).to(self._next_tokens.device))
        for seq, token in zip(batch, tokens):
            seq.issued += 1
            self._append(rows, free, seq, token)

    def _append(self, rows, free, seq: _Sequence, token: int) -> None:
        seq.tokens.append(token)
        if token in seq.stops or len(seq.tokens) >= seq.max_new_tokens:
            self._finish_row(rows, free, seq, _Output(list(seq.tokens), True))
        else:
            self._deliver(seq, _Output(list(seq.tokens)))

    def _fail_step(self, rows, free, batch: list[_Sequence], exc: Exception) -> None:
        log_event("step_failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        for seq in batch:
            self._finish_row(rows, free, seq, _Output(list(seq.tokens), True, f"{type(exc).__name__}: {exc}"))

    def _fail_unfit(self, rows, free, batch: list[_Sequence]) -> list[_Sequence]:
        """The sequences whose prompt fits their row; the others fail alone, before the batch runs."""
        fit = []
        for seq in batch:
            try:
                self.decoder.check_prompt(seq.row, seq.prompt)
                fit.append(seq)
            except ValueError as exc:
                self._finish_row(rows, free, seq, _Output([], True, f"ValueError: {exc}"))
        return fit

    def _prefill_layout(self, batch: list[_Sequence]):
        """The layout of each prefill forward: each row's prompt tokens, right-aligned in the
        forward's width (Decoder.prefill_rows); a prompt's last chunk yields its token 0."""
        by_row = {seq.row: seq for seq in batch}

        def before_forward(spans: list[tuple[int, int, int]], width: int) -> None:
            self._layout = [BatchSlot(by_row[row].request_id, (i + 1) * width - (end - start), (i + 1) * width,
                                      0 if end == len(by_row[row].prompt) else None)
                            for i, (row, start, end) in enumerate(spans)]
        return before_forward

    def _sample(self, batch: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Rows with a sampler become one-hot on its choice (SamplerTable.apply); then one argmax on
        the device for all: the step's host synchronisation."""
        scores = self.samplers.apply(logits, [seq.sampler_slot for seq in batch])  # [B,V]
        return scores.argmax(dim=-1).tolist()

    def _call_outside_batch(self, fn, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self._layout = []  # its routing counts as usage, maps to no request
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 -- handed to the awaiting request, the loop goes on
            loop.call_soon_threadsafe(lambda error=exc: future.done() or future.set_exception(error))
            return
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))

    def _finish_row(self, rows, free, seq: _Sequence, output: _Output) -> None:
        self._release_row(rows, free, seq)
        self._deliver(seq, output)

    def _drop(self, rows: dict[int, _Sequence], free: list[int], request_id: str) -> None:
        for seq in list(rows.values()):
            if seq.request_id == request_id:
                self._release_row(rows, free, seq)

    def _release_row(self, rows, free, seq: _Sequence) -> None:
        if rows.pop(seq.row, None) is not None:
            self.decoder.release(seq.row)
            heapq.heappush(free, seq.row)
            self._rows_held = len(rows)

    def _deliver(self, seq: _Sequence, output: _Output) -> None:
        self._event_loop.call_soon_threadsafe(self._on_output, seq.stream, output)
