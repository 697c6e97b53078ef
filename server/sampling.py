"""Per-request sampling and logits processing, over a batch's logits rows.

A batching engine computes logits for B rows (requests with a new token this step) at
once. Everything a request's parameters do to its own row -- penalties, logit_bias,
min_tokens, temperature / top-k / top-p with its own seeded generator, logprobs -- lives
in its `RequestSampler`, registered in a `SamplerTable` under a slot number. An engine
hands the table its logits [B, V] and each row's slot (`SamplerTable.apply`): every row
with a sampler is replaced by a one-hot row on the token that sampler chose, so the
engine's own greedy argmax picks exactly that token; rows without a sampler (plain greedy
requests) are left alone. The chosen token, its logprobs and any error are kept per
generated index until the engine takes them (`SamplerTable.take`).

So the text of a request depends on its own row and seed only: same seed + same request
-> same text, alone or batched with others. `PerRequestSampler` plugs the table into
transformers' continuous batching as a logits processor; another engine calls `apply`.

Shapes: B rows with a new token this step, V vocabulary.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from . import logits as L

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
    stop_token_ids: tuple[int, ...] = ()  # end the output like EOS does
    ignore_eos: bool = False  # EOS is an ordinary token: generate exactly max_new_tokens
    min_tokens: int = 0  # EOS and stop_token_ids are banned before this many tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: int | None = None  # None: none; N: the chosen token's logprob and the N most likely
    grammar: object | None = None  # an outlines-core Index (grammar.py): only its matches may be generated

    def __post_init__(self):
        assert self.max_new_tokens >= 1 and self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0
        assert self.min_tokens >= 0 and self.repetition_penalty > 0 and (self.logprobs is None or self.logprobs >= 0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_sampler(self) -> bool:
        """False for plain greedy requests: the engine's argmax is all they need."""
        return not (self.is_greedy and self.min_tokens == 0 and not self.logit_bias and self.logprobs is None
                    and self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1
                    and self.grammar is None)


@dataclass(frozen=True)
class StepResult:
    """What a sampler did for one generated token."""

    token_id: int
    logprob: float | None = None  # of token_id under the model's distribution (raw logits)
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens, (id, logprob)
    error: str | None = None  # this row failed: the request must end with this error


class RequestSampler:
    """One request's logits processing and choice, one row at a time (the compute thread's)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: list[int], vocab_size: int):
        self.params = params
        self.generated = 0
        self.results: dict[int, StepResult] = {}
        if not params.is_greedy:
            warpers = [TemperatureLogitsWarper(params.temperature)]
            if params.top_k:
                warpers.append(TopKLogitsWarper(min(params.top_k, vocab_size)))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            self.warpers = LogitsProcessorList(warpers)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)  # [S] banned until min_tokens
        self.stop_set = set(stop_ids)
        self.bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)  # [N]
        self.bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)  # [N]
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # [V]
            self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size)  # [V]
        self.guide = None
        if params.grammar is not None:
            from outlines_core import Guide  # only requests with a response_format need outlines-core

            self.guide = Guide(params.grammar)

    def choose(self, row: torch.Tensor) -> int:
        """row: [V] logits of this request's next token. Returns the token; records its StepResult."""
        p = self.params
        scores = row.detach().float().cpu().clone()  # [V]
        logprobs = torch.log_softmax(scores, dim=-1) if p.logprobs is not None else None  # [V]
        if self.generated < p.min_tokens and self.stop_ids.numel():
            L.ban(scores, self.stop_ids)
        if self.bias_ids.numel():
            L.add_bias(scores, self.bias_ids, self.bias)
        if self.seen is not None:
            scores = L.repetition_penalty(scores, self.seen, p.repetition_penalty)
        if self.counts is not None:
            scores = L.frequency_presence(scores, self.counts, p.frequency_penalty, p.presence_penalty)
        if self.guide is not None:
            scores = L.only(scores, torch.tensor(self.guide.get_tokens(), dtype=torch.long))
        token = int(scores.argmax()) if p.is_greedy else self._sample(scores)
        if self.guide is not None and token not in self.stop_set:  # EOS ends a finished grammar: no transition
            self.guide.advance(token, return_tokens=False)  # raises if the token breaks the grammar
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        result = StepResult(token)
        if logprobs is not None:
            result = StepResult(token, float(logprobs[token]), tuple(L.top_logprobs(logprobs, p.logprobs)))
        self.results[self.generated] = result
        self.generated += 1
        return token

    def fail(self, error: str) -> None:
        self.results[self.generated] = StepResult(-1, error=error)
        self.generated += 1

    def _sample(self, scores: torch.Tensor) -> int:
        warped = self.warpers(None, scores.unsqueeze(0))  # [1, V]
        probs = torch.softmax(warped, dim=-1)  # [1, V]
        return int(torch.multinomial(probs, 1, generator=self.generator))


class SamplerTable:
    """Slot -> RequestSampler, shared by the event loop (register/take/release) and the compute thread (apply)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._samplers: dict[int, RequestSampler] = {}
        self._next = 0

    def register(self, params: SamplingParams, prompt_ids: list[int], stop_ids: list[int]) -> int:
        """A slot for this request (GREEDY_SLOT when it needs none). Raises what the sampler's set-up raises."""
        if not params.needs_sampler:
            return GREEDY_SLOT
        sampler = RequestSampler(params, prompt_ids, stop_ids, self.vocab_size)
        with self._lock:
            slot, self._next = self._next, self._next + 1
            self._samplers[slot] = sampler
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._samplers.pop(slot, None)

    def take(self, slot: int, index: int) -> StepResult | None:
        """The result of a request's index-th generated token, handed over once (None: greedy, or none)."""
        with self._lock:
            sampler = self._samplers.get(slot)
            return sampler.results.pop(index, None) if sampler is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._samplers)

    def apply(self, scores: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """scores [B, V], slots [B]: rows with a sampler become one-hot on its choice.

        Never raises: a row whose processing fails is recorded as that request's error
        (the engine ends that request) and left to the argmax, so the batch goes on.
        """
        with self._lock:
            samplers = [self._samplers.get(slot) if slot != GREEDY_SLOT else None for slot in slots]
        if all(s is None for s in samplers):
            return scores
        scores = scores.clone()
        for row, sampler in enumerate(samplers):
            if sampler is None:
                continue
            try:
                token = sampler.choose(scores[row])
            except Exception as exc:  # noqa: BLE001 -- one request's failure must not stop the batch
                sampler.fail(f"{type(exc).__name__}: {exc}")
                continue
            scores[row].fill_(float("-inf"))  # the argmax that follows picks exactly `token`
            scores[row, token] = 0.0
        return scores


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    """transformers' continuous batching adapter: each row's slot comes from its request's kwargs."""

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
        return self.table.apply(scores, tensor_arg[: scores.size(0)].tolist())
