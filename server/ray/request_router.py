"""Ray Serve request routers for cadre replicas (RequestRouter API, alpha in Ray 2.60).

- ExpertAffinityRouter: router.affinity.place() over the replicas' routing stats (what
  their expert caches hold and their recent traffic used) and queue lengths, for the
  experts the ingress predicted from the prompt. Decisions are counted in
  cadre_router_decisions_total{outcome} (server/ray/metrics.py).
- PowerOfTwoRouter and RoundRobinRouter: Ray's own policies, for comparison (bench affinity).

All three route a request that names a replica (ForwardedRequest.replica) to that replica
only: the ingress scrapes every replica's /metrics that way. Each router registers itself
by application name, so the ingress in the same process can list the replicas it routes to
(router_support.py: Serve pickles this module by value, so it holds no state of its own).

Queue lengths come from Serve's queue-length cache (`replica_queue_len_cache`, public), or,
where it has no entry, from the requests this router has in flight there. Routing stats
arrive through the controller every request_routing_stats_period_s.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.experimental.round_robin_router import RoundRobinRouter as RayRoundRobinRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.affinity import DEFAULT_IMBALANCE, DEFAULT_MIN_GAIN, Candidate, ReplicaSummary, place

from .router_support import PinnedOrInherited, PinnedRequests, count_decision, forwarded

MAX_TRACKED = 10_000  # decisions awaiting on_request_routed (cancelled requests never get there)


class ExpertAffinityRouter(PinnedRequests, RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, min_gain: float = DEFAULT_MIN_GAIN, **_):
        self.imbalance, self.min_gain = imbalance, min_gain
        self._in_flight: Counter[ReplicaID] = Counter()
        self._decisions: OrderedDict[str, tuple[str, str]] = OrderedDict()  # request id -> (outcome, favourite)
        self.register()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        request = forwarded(pending_request)
        pinned = self.pinned(candidate_replicas, request)
        if pinned is not None:
            self._remember(pending_request, "pinned", request.replica)
            return pinned
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        candidates = [Candidate(key, self._queue_len(r), ReplicaSummary.from_stats(r.routing_stats))
                      for key, r in by_id.items()]
        prediction = request.prediction if request is not None else None
        placement = place(prediction, request.layers if request else [], candidates, self.imbalance, self.min_gain)
        self._remember(pending_request, placement.outcome, placement.ranked[0])
        return [[by_id[key]] for key in placement.ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._in_flight[replica_id] += 1
        if pending_request is None:
            return
        decision = self._decisions.pop(pending_request.metadata.internal_request_id, None)
        if decision is None:
            return
        outcome, favourite = decision
        if outcome == "affinity" and replica_id.unique_id != favourite:
            outcome = "fallback"  # the favourite was full: Serve took the next rank
        count_decision(outcome)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._in_flight[replica_id] -= 1
        if self._in_flight[replica_id] <= 0:
            del self._in_flight[replica_id]

    def _queue_len(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return cached if cached is not None else self._in_flight[replica.replica_id]

    def _remember(self, pending_request: PendingRequest | None, outcome: str, favourite: str | None) -> None:
        if pending_request is None:
            return
        self._decisions[pending_request.metadata.internal_request_id] = (outcome, favourite)
        while len(self._decisions) > MAX_TRACKED:
            self._decisions.popitem(last=False)


class PowerOfTwoRouter(PinnedOrInherited, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default (two random replicas, the shorter queue), with pinning."""


class RoundRobinRouter(PinnedOrInherited, RayRoundRobinRouter):
    """Ray Serve's experimental round robin, with pinning."""


ROUTERS = {"affinity": ExpertAffinityRouter, "power-of-two": PowerOfTwoRouter, "round-robin": RoundRobinRouter}
