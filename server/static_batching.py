"""A batched path for models whose attention transformers' continuous batching cannot page.

Continuous batching keeps K and V in pages of [num_key_value_heads, head_dim] per layer.
Attention that caches anything else has no place there: DeepSeek-V2/V3's MLA caches one
compressed latent "head" whose K and V differ in width (kv_lora_rank vs qk_rope_head_dim),
so its first write fails (`index_copy_(): Source/destination tensor must have same slice
shapes`), and linear-attention or Mamba layers keep recurrent states, not pages.

`StaticBatchingManager` serves those through transformers' own `generate()` (DynamicCache,
which stores whatever each layer caches): when the loop is free, the oldest waiting request
and the others waiting with a prompt of the same length form one batch, decoded together to
the end; the rest wait for the next batch. Never padded, because left-padding is not exact
for every family: transformers' own padded batches of MiniMax (lightning attention, from the
second step on) and HY-V4 (indexed attention) choose other tokens for a prompt than
the prompt alone does, so a request's answer would depend on what else is in flight. It
offers the part of ContinuousBatchingManager's interface the engine uses (add_request,
register_result_handler, cancel_request, start, stop, is_running), so the engine's admission,
streaming, sampling and routing traces are the same on both paths. A request alone in its
batch decodes exactly as transformers' generate() does (tests/test_server_families.py,
tests/test_server_every_family.py).

Legend: B requests in the batch, S their prompt length, V vocabulary.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .routing import BatchSlot
from .sampling import GREEDY_SLOT, SLOT_KWARG, SamplerTable


@dataclass
class StaticOutput:
    """What a result handler receives (the fields the engine reads of GenerationOutput)."""

    request_id: str
    generated_tokens: list[int]
    error: str | None = None
    finished: bool = False

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset
    slot: int
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False


class StaticBatchingManager:
    def __init__(self, model, samplers: SamplerTable, max_requests: int, pad_token_id: int = 0):
        self.model, self.samplers, self.max_requests = model, samplers, max_requests
        self.pad_token_id = pad_token_id
        self._pending: list[_Request] = []
        self._handlers: dict[str, tuple] = {}  # request id -> (callback, loop)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch: list[_Request] = []  # the batch decoding now (compute thread)
        self._forward = 0  # forwards of the current batch so far: 0 = prefill
        self._model_lock = threading.Lock()  # held while a batch decodes; pause() takes it between batches

    # --- the engine's side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cadre-static-batching", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, block: bool = True, timeout: float | None = None) -> None:
        with self._cv:
            self._stopping = True
            for request in self._batch:
                request.cancelled = True
            self._cv.notify_all()
        if block and self._thread is not None:
            self._thread.join(timeout)

    def register_result_handler(self, request_id: str, callback) -> None:
        self._handlers[request_id] = (callback, asyncio.get_running_loop())

    @contextmanager
    def pause(self):
        """The model to the caller between two batches (prompt scoring): a batch decodes to its end first."""
        with self._model_lock:
            yield

    def rows_held(self) -> int:
        """Requests whose cache the batch decoding now still holds."""
        return sum(1 for r in list(self._batch) if not (r.finished or r.cancelled))

    def forget(self, request_id: str) -> None:
        self._handlers.pop(request_id, None)

    def add_request(self, prompt_ids, request_id: str, max_new_tokens: int, streaming: bool = True,
                    eos_token_id=-1, **kwargs):
        eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        request = _Request(request_id, list(prompt_ids), max_new_tokens, frozenset(e for e in eos if e >= 0),
                           kwargs.get(SLOT_KWARG, GREEDY_SLOT))
        with self._cv:
            if self._stopping:
                return None
            self._pending.append(request)
            self._cv.notify_all()
        return request_id

    def cancel_request(self, request_id: str) -> None:
        with self._cv:
            self._pending = [r for r in self._pending if r.request_id != request_id]
            for request in self._batch:
                if request.request_id == request_id:
                    request.cancelled = True

    def batch_layout(self) -> list[BatchSlot]:
        """Rows of each request in the forward running now (the model flattens [B, S] batch-major)."""
        width = len(self._batch[0].prompt_ids) if self._forward == 0 else 1
        slots = []
        for i, request in enumerate(self._batch):
            if request.finished or request.cancelled:
                continue
            slots.append(BatchSlot(request.request_id, i * width, (i + 1) * width, self._forward))
        return slots

    # --- compute thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    return
                batch = self._take_batch()
            try:
                with self._model_lock:
                    self._decode(batch)
            except Exception as exc:  # a failed batch fails its requests, never the loop
                for request in batch:
                    if not request.finished:
                        request.finished = True
                        self._deliver(request, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._batch = []

    def _take_batch(self) -> list[_Request]:
        """The oldest waiting request and the others whose prompts have its length (caller holds _cv)."""
        length = len(self._pending[0].prompt_ids)
        batch = [r for r in self._pending if len(r.prompt_ids) == length][: self.max_requests]
        taken = {r.request_id for r in batch}
        self._pending = [r for r in self._pending if r.request_id not in taken]
        return batch

    @torch.inference_mode()
    def _decode(self, batch: list[_Request]) -> None:
        ids = torch.tensor([r.prompt_ids for r in batch])  # [B,S]: one prompt length, no padding
        self._batch, self._forward = batch, 0
        # eos_token_id [] (not None, which generate() replaces with the model's EOS): the rows stop on
        # their own requests' stop tokens (_RowsDone), so ignore_eos and stop_token_ids hold
        config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in batch),
                                  pad_token_id=self.pad_token_id, eos_token_id=[])
        self.model.generate(ids.to(self.model.device), attention_mask=torch.ones_like(ids).to(self.model.device),
                            generation_config=config,
                            logits_processor=LogitsProcessorList([_RowSampler(self)]),
                            stopping_criteria=StoppingCriteriaList([_RowsDone(self)]))

    def _on_tokens(self, next_tokens: torch.Tensor) -> None:
        """One decoding step chose next_tokens [B]: stream them to their requests."""
        for request, token in zip(self._batch, next_tokens.tolist()):
            if request.finished:
                continue
            if request.cancelled:
                request.finished = True
                continue
            request.tokens.append(token)
            request.finished = token in request.eos_token_ids or len(request.tokens) >= request.max_new_tokens
            self._deliver(request)
        self._forward += 1

    def _deliver(self, request: _Request, error: str | None = None) -> None:
        handler = self._handlers.get(request.request_id)
        if handler is None:
            return
        callback, loop = handler
        output = StaticOutput(request.request_id, list(request.tokens), error, finished=request.finished)
        if output.finished:
            self._handlers.pop(request.request_id, None)
        loop.call_soon_threadsafe(callback, output)


class _RowSampler(LogitsProcessor):
    """Each sampling request's row becomes one-hot on its own sample (server.sampling); greedy rows stay."""

    def __init__(self, manager: StaticBatchingManager):
        self.manager = manager

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores [B,V]
        slots = [GREEDY_SLOT if request.finished else request.slot for request in self.manager._batch]
        return self.manager.samplers.apply(scores, slots)


class _RowsDone(StoppingCriteria):
    """Called by generate() after each step with the tokens appended: streams them, then says
    which rows are done (their own max_new_tokens, EOS, or cancelled)."""

    def __init__(self, manager: StaticBatchingManager):
        self.manager = manager

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # input_ids [B, S+n]
        self.manager._on_tokens(input_ids[:, -1])
        done = [r.finished or r.cancelled for r in self.manager._batch]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
