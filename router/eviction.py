"""Eviction policies beyond LRU, looked up by name by the runtime (`RuntimeConfig(eviction=...)`).

The cache calls `victim(candidates, cache)` with its unpinned resident (layer, expert)
keys in LRU order, oldest first, and evicts the key returned (None: nothing evictable).
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable

from .signals import UsageHistory

Key = tuple[int, int]


class SalienceEviction:
    """Evict the least salient of the `window` least recently used experts.

    Salience of a resident expert e: s_e = Reward_e * (1 - Novelty_e), its decayed
    routing-weight mass times how habitually it is used (1 - 1/(1 + c_e)). An expert
    loaded but never routed to (a missed prediction) scores 0 and goes first; ties go
    to the least recently used. Looking only at the LRU end keeps the cost bounded and
    recency in play. Learns from the runtime's routing events once attached.
    """

    name = "salience"

    def __init__(self, window: int = 16, decay: float = 0.95):
        self.window, self.decay = window, decay
        self.history: UsageHistory | None = None

    def attach(self, runtime) -> None:
        self.history = UsageHistory(runtime.store.num_experts, self.decay)
        runtime.add_routing_listener(self.history)

    def salience(self, key: Key) -> float:
        if self.history is None:
            return 0.0
        layer, expert = key
        return self.history.reward(layer, expert) * (1.0 - self.history.novelty(layer, expert))

    def victim(self, order: Iterable[Key], cache) -> Key | None:
        oldest = list(islice(order, self.window))
        return min(oldest, key=self.salience, default=None)  # min keeps the first (oldest) of ties


EVICTION_POLICIES: dict[str, type] = {"salience": SalienceEviction}
