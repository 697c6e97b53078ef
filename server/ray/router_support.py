"""What the request routers share, kept out of request_router.py on purpose: Serve pickles a
request router's own module *by value* (RequestRouterConfig registers it), so module state
there (a lock, the registry, a Prometheus counter) would be copied into every process that
unpickles the router, not shared with the ingress running beside it. Objects of this module
are pickled by reference: the routers and the ingress in one process see one registry.
"""

from __future__ import annotations

import threading

from .forwarding import ForwardedRequest
from .metrics import DECISIONS

_routers: dict[str, object] = {}
_lock = threading.Lock()


def register(app_name: str, router) -> None:
    with _lock:
        _routers[app_name] = router


def replica_ids(app_name: str) -> list[str] | None:
    """Ids of the replicas the router of `app_name` in this process routes to; None before it exists."""
    with _lock:
        router = _routers.get(app_name)
    return None if router is None else sorted(r.unique_id for r in router.curr_replicas)


def forwarded(pending_request) -> ForwardedRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, ForwardedRequest) else None


def count_decision(outcome: str) -> None:
    DECISIONS.labels(outcome).inc()


class PinnedRequests:
    """Requests naming a replica go there (an empty rank when it is gone: the ingress checks first)."""

    def register(self) -> None:
        register(self.app_name, self)

    def pinned(self, candidates: list, request: ForwardedRequest | None):
        if request is None or request.replica is None:
            return None
        return [[r for r in candidates if r.replica_id.unique_id == request.replica]]


class PinnedOrInherited(PinnedRequests):
    """Pinning in front of a router whose own choose_replicas comes next in the MRO."""

    def initialize_state(self, **_):
        self.register()

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pinned = self.pinned(candidate_replicas, forwarded(pending_request))
        if pinned is not None:
            return pinned
        return await super().choose_replicas(candidate_replicas, pending_request)
