"""Eviction policies beyond LRU, looked up by name by the runtime (`RuntimeConfig(eviction=...)`).

The cache calls `victim(candidates, cache, incoming)` with its unpinned resident
(layer, expert) keys in LRU order, oldest first, and the key it needs a slot for; it
evicts the key returned (None: nothing evictable). Called with the cache's lock held.
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

    def victim(self, order: Iterable[Key], cache, incoming: Key) -> Key | None:
        oldest = list(islice(order, self.window))
        return min(oldest, key=self.salience, default=None)  # min keeps the first (oldest) of ties


class LayerShareEviction:
    """LRU within fair per-layer shares: each MoE layer may keep num_slots / layers slots.

    A forward visits the layers in a cycle, so when a batch's working set over all
    layers exceeds the budget, global LRU evicts exactly the experts the next layers
    are about to use (a cyclic scan: hit rate near zero). Here a layer under its share
    takes the least recently used slot of the layer furthest over its share (else the
    most recently used expert of another layer: in a cycle, the one needed last); a layer at
    its share replaces its own least recently used expert, and when all of its experts
    are pinned by the forward in progress, the rest of its working set streams through
    its own slots (None: the cache computes what is pinned first) instead of evicting
    the other layers' shares.
    """

    name = "layer-lru"

    def victim(self, order: Iterable[Key], cache, incoming: Key) -> Key | None:
        share = max(1, cache.num_slots // len(cache.store.moe_layers))
        at_share = cache.layer_count(incoming[0]) >= share
        if at_share:
            own = cache.oldest_evictable(incoming[0])
            if own is not None:
                return own
        # O(layers) a call: finding the oldest key of any layer over its share by scanning the LRU
        # order cost ~0.5 us a key, the whole order whenever no layer was over (the cache keeps
        # spare slots free on a GPU, so an eviction often leaves its layer under its share): at
        # full depth ~2000 keys, about 1 ms an eviction on the server's decode path
        for layer in cache.layers_over(share):
            key = cache.oldest_evictable(layer)
            if key is not None:
                return key
        # Under its share and no layer over: the layer just computed gives a slot, the one whose
        # next use is a whole forward away. The global LRU expert, taken before, belonged to the
        # layer just ahead, which then took the next one's, round the cycle: with the spare slots
        # a GPU keeps free, a batch of 16 at full depth hit nothing (bench cache-host)
        return None if at_share else cache.most_recent_evictable(incoming[0])


EVICTION_POLICIES: dict[str, type] = {"salience": SalienceEviction, "layer-lru": LayerShareEviction}
