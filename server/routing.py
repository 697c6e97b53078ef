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
from router.signals import USAGE_DECAY, novelty

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
        # For /v1/experts: decayed SNARC usage (Novelty, Reward: router.signals.UsageHistory's
        # recurrence c <- d * c + uses, kept as [L, E] to update once per forward) and the
        # recent forwards' choices, each {layer: [T,K] experts sorted by weight}, whole
        # forwards so that pathways line up across layers.
        self.decay = USAGE_DECAY
        self.usage_counts = torch.zeros(len(self.moe_layers), num_experts)  # [L, E]
        self.usage_mass = torch.zeros(len(self.moe_layers), num_experts)  # [L, E]
        self._recent: deque[dict[int, torch.Tensor]] = deque()
        self._recent_rows = 0
        self._forward: list = []  # this forward's events so far, one per MoE layer in order
        self._layer_offsets = (torch.arange(len(self.moe_layers)) * num_experts).view(-1, 1, 1)  # [L, 1, 1]

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
        """A runtime RoutingEvent: experts/weights [T, K] (CPU, -1 = unused slot).

        A forward's events are kept until its last MoE layer and accounted together: a
        decode step has a handful of rows, where each small tensor op costs microseconds of
        Python overhead, so one op over [L, T, K] instead of one per layer is most of the
        listener's time per token (about 1.2 ms -> 0.3 ms on the demo model's 8 layers).
        """
        row = self._row.get(event.layer)
        if row is None:
            return
        if row == 0:  # first MoE layer of a forward: the batch may have changed since the last one
            self._layout = self.batch_layout()
            self._forward = []
        if len(self._forward) != row:  # joined mid-forward, or a forward broke off: not a whole forward
            return
        self._forward.append(event)
        if row == len(self.moe_layers) - 1:
            events, self._forward = self._forward, []
            self._account(events)

    def _account(self, events: list) -> None:
        """Every MoE layer of one forward, in layer order."""
        experts = torch.stack([e.experts for e in events])  # [L, T, K]
        weights = torch.stack([e.weights for e in events])  # [L, T, K]
        num_layers, num_experts = self.activations.shape
        used = experts >= 0  # [L, T, K]
        flat = (experts + self._layer_offsets)[used]  # [A] layer * E + expert
        weight = weights[used].float()  # [A]
        uses = torch.bincount(flat, minlength=num_layers * num_experts).view(num_layers, num_experts)  # [L, E]
        mass = torch.zeros(num_layers * num_experts).index_add_(0, flat, weight).view(num_layers, num_experts)  # [L, E]
        self.activations += uses
        self.queries += torch.tensor([len(e.outcomes) for e in events])
        self.hits += torch.tensor([sum(1 for o in e.outcomes.values() if o in HIT_OUTCOMES) for e in events])
        # The policy routed each layer just before its experts ran: the growth of its count
        # since the last forward is this forward's substitutions.
        total = self.substitutions()
        regret, self.regret_total = total - self.regret_total, total
        order = weights.argsort(dim=-1, descending=True, stable=True)  # [L, T, K]
        ranked = experts.gather(2, order)  # [L, T, K] experts sorted by weight
        with self._lock:
            # UsageHistory's decayed counts and mass (c <- d * c + uses), every layer at once
            self.usage_counts.mul_(self.decay).add_(uses.float())
            self.usage_mass.mul_(self.decay).add_(mass)
            self._recent.append({layer: ranked[i] for i, layer in enumerate(self.moe_layers)})
            self._recent_rows += experts.shape[1]
            while self._recent_rows > ANALYTICS_WINDOW and len(self._recent) > 1:
                self._recent_rows -= next(iter(self._recent.popleft().values())).shape[0]
            for slot in self._layout:
                record = self._requests.get(slot.request_id)
                if record is not None:
                    self._record(record, slot, events, experts, weights, regret)

    def analytics(self, present: dict[int, list[int]]) -> dict:
        """router.analytics over the last ANALYTICS_WINDOW token rows, and SNARC usage signals."""
        with self._lock:
            forwards = list(self._recent)
            counts, mass = self.usage_counts.clone(), self.usage_mass.clone()
        num_experts = self.activations.shape[1]
        per_layer = {layer: torch.cat([f[layer] for f in forwards]) for layer in self.moe_layers} if forwards else {}
        layers = {}
        for row, layer in enumerate(self.moe_layers):
            indices = per_layer.get(layer)
            layers[layer] = {
                "entropy": routing_entropy(indices, num_experts) if indices is not None else None,
                "utilisation": utilisation(indices, present[layer]) if indices is not None else None,
                "novelty": [round(n, 4) for n in novelty(counts[row]).tolist()],
                "reward": [round(m, 4) for m in mass[row].tolist()],
            }
        return {"window_tokens": sum(next(iter(f.values())).shape[0] for f in forwards),
                "distinct_pathways": distinct_pathways(list(per_layer.values())) if per_layer else 0,
                "layers": layers}

    def _record(self, record: RequestRouting, slot: BatchSlot, events: list, experts: torch.Tensor,
                weights: torch.Tensor, regret: int) -> None:
        """One request's rows of a forward: experts/weights [L, T, K], events in layer order."""
        if slot.end <= slot.start:
            return
        rows = experts[:, slot.start:slot.end].tolist()  # [L][q][K]
        record.regret += regret
        step = None
        if slot.step is not None:
            step = record.steps.setdefault(slot.step, StepRouting(layers=[] if record.trace else None))
            step_weights = weights[:, slot.end - 1].tolist()  # [L][K]
        for i, (event, layer_rows) in enumerate(zip(events, rows)):
            outcomes = event.outcomes
            record.loads += sum(1 for e in {e for r in layer_rows for e in r if e >= 0} if outcomes.get(e) == "miss")
            record.load_seconds += event.load_seconds
            for r in (layer_rows[:-1] if step is not None else layer_rows):
                for e in r:
                    if e >= 0:
                        record.prompt_outcomes[outcomes.get(e, "unknown")] += 1
            if step is None:
                continue
            pairs = [(e, w) for e, w in zip(layer_rows[-1], step_weights[i]) if e >= 0]
            cache = [outcomes.get(e, "unknown") for e, _ in pairs]
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
