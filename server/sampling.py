"""Per-request sampling inside transformers' continuous batching.

Continuous batching samples every row of a batch with one global `torch.multinomial`,
so a request's text would depend on which other requests shared its steps. cadre runs
the batch greedy (argmax) and plugs in `PerRequestSampler`, a continuous-batching
logits processor: each sampling request owns a `torch.Generator` seeded from its seed
and draws exactly one sample per token from its own row, then leaves a one-hot row
for the argmax. Same seed + same request -> same text, alone or batched with others.

Shapes: B rows with a new token this step, V vocabulary.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

SLOT_KWARG = "cadre_sampler"  # the per-request kwarg continuous batching hands to the processor
GREEDY_SLOT = -1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        assert self.max_new_tokens >= 1 and self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class RequestSampler:
    """One request's warpers (in generate()'s order: temperature, top-k, top-p) and generator."""

    def __init__(self, params: SamplingParams):
        assert not params.is_greedy
        warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self, scores: torch.Tensor) -> int:
        """scores: [V] float logits of this request's next token."""
        warped = self.warpers(None, scores.float().cpu().unsqueeze(0))  # [1, V]
        probs = torch.softmax(warped, dim=-1)  # [1, V]
        return int(torch.multinomial(probs, 1, generator=self.generator))


class SamplerTable:
    """Slot -> RequestSampler, shared by the event loop (register/release) and the compute thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._samplers: dict[int, RequestSampler] = {}
        self._next = 0

    def register(self, params: SamplingParams) -> int:
        if params.is_greedy:
            return GREEDY_SLOT
        with self._lock:
            slot, self._next = self._next, self._next + 1
            self._samplers[slot] = RequestSampler(params)
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._samplers.pop(slot, None)

    def get(self, slot: int) -> RequestSampler | None:
        with self._lock:
            return self._samplers.get(slot)


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    """Continuous-batching logits processor: rows of sampling requests become one-hot on their sample."""

    supported_kwargs = {SLOT_KWARG: int}
    ignored_kwargs = ()

    def __init__(self, table: SamplerTable):
        self.table = table

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY_SLOT)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        slots = [r.state.logit_processor_kwargs.get(SLOT_KWARG, GREEDY_SLOT) for r in requests_with_new_token]
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """scores: [B, V]; tensor_arg: [>= B] int32 slots (GREEDY_SLOT rows are left to the argmax)."""
        slots = tensor_arg[: scores.size(0)].tolist()
        if all(slot == GREEDY_SLOT for slot in slots):
            return scores
        scores = scores.clone()
        for row, slot in enumerate(slots):
            sampler = self.table.get(slot) if slot != GREEDY_SLOT else None
            if sampler is None:
                continue
            token = sampler.sample(scores[row])
            scores[row].fill_(float("-inf"))  # the argmax that follows picks exactly `token`
            scores[row, token] = 0.0
        return scores
