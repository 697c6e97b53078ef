"""Routing of a packed continuous batch, mapped back to the requests in it.

Continuous batching runs every scheduled request in one flat forward: input_ids is
[1, T] with request i's query tokens at rows cu[i]:cu[i+1] (cu = cumulative query
lengths, in the order of the batch's request list). The runtime reports each MoE
layer's routing for those T rows; a request's *step* is the row whose logits give its
next token (the last of its rows, when the batch gives it one). Everything here runs on
the compute thread, inside the forward, where the batch's layout is current.

A step's cache outcomes are handed over with the step (take_step), so the counts of the
tokens a request actually returns add up to exactly what its trace shows; loads and
load_seconds cover every forward it was part of (a load that served several requests
counts for each of them).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from router.analytics import distinct_pathways, routing_entropy, utilisation
from router.signals import UsageHistory, novelty

HIT_OUTCOMES = ("hit", "prefetched")  # resident when the layer asked for it: no wait
ANALYTICS_WINDOW = 4096  # most recent token rows kept for /v1/experts' routing analytics


@dataclass(frozen=True)
class BatchSlot:
    """One request's rows in a packed forward; `step` = its new token's index, None mid-prefill."""

    request_id: str
    start: int
    end: int
    step: int | None


@dataclass
class StepRouting:
    """The forward that produced one token, as that token saw it."""

    outcomes: Counter = field(default_factory=Counter)  # hit / miss / prefetched over its layers' experts
    layers: list[dict] | None = None  # [{"layer", "experts", "weights", "cache"}] (trace only)


@dataclass
class RequestRouting:
    """What one request's forwards routed and what the cache did for them."""

    trace: bool
    loads: int = 0
    load_seconds: float = 0.0
    regret: int = 0  # substitutions in its forwards (shared with co-batched requests)
    prompt_outcomes: Counter = field(default_factory=Counter)  # over rows that were not steps
    steps: dict[int, StepRouting] = field(default_factory=dict)  # until taken by the event loop


class RoutingRecorder:
    """Turns routing events into per-request records and global per-layer usage counts."""

    def __init__(self, moe_layers: list[int], num_experts: int, batch_layout, substitutions=lambda: 0):
        self.moe_layers = list(moe_layers)
        self.substitutions = substitutions  # () -> the routing policy's cumulative substitution count
        self._row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.batch_layout = batch_layout  # () -> list[BatchSlot] of the forward running now
        self._layout: list[BatchSlot] = []
        self._lock = threading.Lock()
        self._requests: dict[str, RequestRouting] = {}
        # Global usage, exported by /metrics and /v1/experts: [L, E] and [L]
        self.activations = torch.zeros(len(self.moe_layers), num_experts, dtype=torch.int64)
        self.queries = torch.zeros(len(self.moe_layers), dtype=torch.int64)
        self.hits = torch.zeros(len(self.moe_layers), dtype=torch.int64)
        self.regret_total = substitutions()  # the policy's count as of the last event
        # For /v1/experts: decayed SNARC usage (Novelty, Reward) and the recent forwards'
        # choices, each {layer: [T,K] experts sorted by weight}, whole forwards so that
        # pathways line up across layers.
        self.history = UsageHistory(num_experts)
        self._recent: deque[dict[int, torch.Tensor]] = deque()
        self._recent_rows = 0

    # --- event loop side -------------------------------------------------------------
    def register(self, request_id: str, trace: bool) -> None:
        with self._lock:
            self._requests[request_id] = RequestRouting(trace=trace)

    def release(self, request_id: str) -> RequestRouting | None:
        with self._lock:
            return self._requests.pop(request_id, None)

    def take_step(self, request_id: str, step: int) -> StepRouting:
        """The routing of a request's step, handed over once."""
        with self._lock:
            record = self._requests.get(request_id)
            found = record.steps.pop(step, None) if record is not None else None
        return found if found is not None else StepRouting()

    # --- compute thread side -----------------------------------------------------------
    def __call__(self, event) -> None:
        """A runtime RoutingEvent: experts/weights [T, K] (CPU, -1 = unused slot)."""
        row = self._row.get(event.layer)
        if row is None:
            return
        if row == 0:  # first MoE layer of a forward: the batch may have changed since the last one
            self._layout = self.batch_layout()
        experts = event.experts  # [T, K]
        self._remember(row, event)
        used = experts[experts >= 0]  # [A]
        self.activations[row] += torch.bincount(used, minlength=self.activations.shape[1])
        self.queries[row] += len(event.outcomes)
        self.hits[row] += sum(1 for o in event.outcomes.values() if o in HIT_OUTCOMES)
        # The policy routed this layer just before its experts ran and this event fired:
        # the growth of its count since the last event is this layer's substitutions.
        total = self.substitutions()
        regret, self.regret_total = total - self.regret_total, total
        with self._lock:
            for slot in self._layout:
                record = self._requests.get(slot.request_id)
                if record is not None:
                    self._record(record, slot, event, regret)

    def _remember(self, row: int, event) -> None:
        self.history.observe(event.layer, event.experts, event.weights)
        order = event.weights.argsort(dim=-1, descending=True, stable=True)  # [T,K]
        with self._lock:
            if row == 0:
                self._recent.append({})
                self._recent_rows += event.experts.shape[0]
                while self._recent_rows > ANALYTICS_WINDOW and len(self._recent) > 1:
                    oldest = self._recent.popleft()
                    self._recent_rows -= next(iter(oldest.values())).shape[0] if oldest else 0
            if self._recent:
                self._recent[-1][event.layer] = event.experts.gather(1, order)

    def analytics(self, present: dict[int, list[int]]) -> dict:
        """router.analytics over the last ANALYTICS_WINDOW token rows, and SNARC usage signals."""
        with self._lock:
            forwards = [f for f in self._recent if len(f) == len(self.moe_layers)]
        num_experts = self.activations.shape[1]
        per_layer = {layer: torch.cat([f[layer] for f in forwards]) for layer in self.moe_layers} if forwards else {}
        layers = {}
        for layer in self.moe_layers:
            indices = per_layer.get(layer)
            counts = self.history.counts.get(layer, torch.zeros(num_experts))
            mass = self.history.mass.get(layer, torch.zeros(num_experts))
            layers[layer] = {
                "entropy": routing_entropy(indices, num_experts) if indices is not None else None,
                "utilisation": utilisation(indices, present[layer]) if indices is not None else None,
                "novelty": [round(n, 4) for n in novelty(counts).tolist()],
                "reward": [round(m, 4) for m in mass.tolist()],
            }
        return {"window_tokens": sum(next(iter(f.values())).shape[0] for f in forwards),
                "distinct_pathways": distinct_pathways(list(per_layer.values())) if per_layer else 0,
                "layers": layers}

    def _record(self, record: RequestRouting, slot: BatchSlot, event, regret: int) -> None:
        rows = event.experts[slot.start:slot.end]  # [q, K]
        if rows.shape[0] == 0:
            return
        mine = set(rows[rows >= 0].tolist())
        record.loads += sum(1 for e in mine if event.outcomes.get(e) == "miss")
        record.load_seconds += event.load_seconds
        record.regret += regret
        prompt_rows = rows[:-1] if slot.step is not None else rows
        for e in prompt_rows[prompt_rows >= 0].tolist():
            record.prompt_outcomes[event.outcomes.get(e, "unknown")] += 1
        if slot.step is None:
            return
        pairs = [(e, w) for e, w in zip(rows[-1].tolist(), event.weights[slot.end - 1].tolist()) if e >= 0]
        cache = [event.outcomes.get(e, "unknown") for e, _ in pairs]
        step = record.steps.setdefault(slot.step, StepRouting(layers=[] if record.trace else None))
        step.outcomes.update(cache)
        if record.trace:
            step.layers.append({"layer": event.layer, "experts": [e for e, _ in pairs],
                                "weights": [w for _, w in pairs], "cache": cache})


def pathway_summary(steps: list[list[dict]], most_common: int = 5) -> dict:
    """A token's pathway = the top-1 (highest-weight) expert of every MoE layer, in layer order."""
    pathways = Counter()
    for layers in steps:
        pathways[tuple(entry["experts"][max(range(len(entry["weights"])), key=entry["weights"].__getitem__)]
                       for entry in layers if entry["experts"])] += 1
    return {
        "tokens": sum(pathways.values()),
        "distinct": len(pathways),
        "most_common": [{"experts": list(p), "count": n} for p, n in pathways.most_common(most_common)],
    }
