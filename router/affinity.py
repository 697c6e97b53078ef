"""Expert-affinity placement: which replica should take a request, from the experts its
prompt is predicted to route to (router.token_profile) and what each replica's expert
cache holds. Pure functions over plain data; Ray Serve's request router calls them
(server/ray/request_router.py) with the summaries replicas publish as routing stats.

A replica's summary, per MoE layer: `resident`, the experts its cache holds now, and
`hot`, the experts its recent traffic used most (as many as the layer's share of slots,
from the decayed usage counts that also drive Novelty and Reward). Either alone is a
noisy guess of what will be resident when the request runs (a snapshot under LRU churn;
a usage ranking the cache may not follow), so an expert's warmth is the mean of the two.
The expected hit rate of a request there is sum_e p(l, e) * warmth(l, e), averaged over
the predicted layers.

Placement prefers the replica with the best expected hit rate unless its queue is longer
than the shortest one by more than `imbalance` requests: tail latency must not pay for
affinity, so then (a "fallback") the shortest queue wins. Where no replica stands out by
`min_gain` (cold caches, or a prompt that routes like everything), the shortest queue
wins too (a "balanced" decision).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Hashable

OUTCOMES = ("affinity", "fallback", "balanced", "no_prediction", "pinned")
DEFAULT_IMBALANCE = 0  # requests the favourite's queue may exceed the shortest by (0: affinity breaks ties;
#                         bench/results/affinity_cpu_demo*.log: 2 cost p99 1.5x on CPU replicas, 0 none)
DEFAULT_MIN_GAIN = 0.02  # expected hit rate by which the favourite must beat the runner-up


@dataclass(frozen=True)
class ReplicaSummary:
    resident: dict[int, frozenset[int]]  # layer -> experts in the cache now
    hot: dict[int, frozenset[int]]  # layer -> experts recent traffic used most

    def to_stats(self) -> dict:
        """JSON-able, for Ray Serve's routing stats (str keys: they cross a JSON boundary in places)."""
        return {"resident": {str(l): sorted(e) for l, e in self.resident.items()},
                "hot": {str(l): sorted(e) for l, e in self.hot.items()}}

    @classmethod
    def from_stats(cls, stats: dict | None) -> "ReplicaSummary | None":
        if not stats or "resident" not in stats:
            return None
        return cls({int(l): frozenset(e) for l, e in stats["resident"].items()},
                   {int(l): frozenset(e) for l, e in stats.get("hot", {}).items()})


def summarize(resident: list[tuple[int, int]], usage: list[list[float]], moe_layers: list[int],
              num_slots: int) -> ReplicaSummary:
    """A replica's summary from its cache's resident keys and decayed usage counts [L][E]."""
    share = max(1, num_slots // max(1, len(moe_layers)))
    by_layer: dict[int, set[int]] = {layer: set() for layer in moe_layers}
    for layer, expert in resident:
        by_layer.setdefault(layer, set()).add(expert)
    hot = {}
    for layer, counts in zip(moe_layers, usage):
        ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        hot[layer] = frozenset(e for e in ranked[:share] if counts[e] > 0)
    return ReplicaSummary({l: frozenset(e) for l, e in by_layer.items()}, hot)


def expected_hit_rate(prediction: list[list[float]], layers: list[int], summary: ReplicaSummary | None) -> float:
    """Mean over the predicted layers of sum_e p(l, e) * warmth(l, e); 0 for a replica that says nothing."""
    if summary is None or not layers:
        return 0.0
    total = 0.0
    for layer, p in zip(layers, prediction):
        resident, hot = summary.resident.get(layer, frozenset()), summary.hot.get(layer, frozenset())
        total += 0.5 * (sum(p[e] for e in resident if e < len(p)) + sum(p[e] for e in hot if e < len(p)))
    return total / len(layers)


@dataclass(frozen=True)
class Candidate:
    key: Hashable  # the replica, as the caller names it
    queue_len: int | None  # requests it is working on or holding (None: unknown, taken as 0)
    summary: ReplicaSummary | None


@dataclass(frozen=True)
class Placement:
    ranked: list  # candidate keys, most preferred first
    outcome: str  # one of OUTCOMES
    expected: dict  # key -> expected hit rate (empty without a prediction)


def place(prediction: list[list[float]] | None, layers: list[int], candidates: list[Candidate],
          imbalance: int = DEFAULT_IMBALANCE, min_gain: float = DEFAULT_MIN_GAIN) -> Placement:
    assert candidates, "place() needs at least one candidate"
    shuffled = random.sample(candidates, len(candidates))  # equal queues: no replica favoured by its position
    by_queue = sorted(shuffled, key=lambda c: c.queue_len or 0)
    least = by_queue[0].queue_len or 0
    if prediction is None:
        return Placement([c.key for c in by_queue], "no_prediction", {})
    expected = {c.key: expected_hit_rate(prediction, layers, c.summary) for c in candidates}
    by_score = sorted(by_queue, key=lambda c: -expected[c.key])  # stable: equal scores keep queue order
    best = by_score[0]
    if len(by_score) == 1:
        return Placement([best.key], "balanced", expected)  # nothing to choose between
    runner_up = expected[by_score[1].key]
    if expected[best.key] - runner_up < min_gain:
        return Placement([c.key for c in by_queue], "balanced", expected)
    if (best.queue_len or 0) - least > imbalance:
        return Placement([c.key for c in by_queue], "fallback", expected)
    return Placement([c.key for c in by_score], "affinity", expected)
