"""Prometheus exposition for a Ray deployment: every replica's /metrics, labelled.

The ingress scrapes each replica's own /metrics (server/metrics.py, unchanged names) and
serves them as one exposition in which every sample carries `replica="<Serve replica
id>"`: a dashboard sums over replicas (`sum(rate(...))`, as for one server) or splits by
`replica`. The request router's decisions are counted here, in the ingress process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from router.affinity import OUTCOMES

ROUTER_REGISTRY = CollectorRegistry()
DECISIONS = Counter("cadre_router_decisions", "Requests placed by the expert-affinity router, by outcome: affinity "
                    "(the replica with the best expected expert-cache hit rate), fallback (its queue was too long, "
                    "or full: a shorter one took it), balanced (no replica stood out), no_prediction (no prompt), "
                    "pinned (the request named its replica).", ["outcome"], registry=ROUTER_REGISTRY)
for _outcome in OUTCOMES:
    DECISIONS.labels(_outcome)


class _Merged:
    """A collector yielding already-built metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)


def merge_replicas(texts: dict[str, str], label: str = "replica") -> bytes:
    """One exposition of several replicas' texts, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(Sample(s.name, {label: replica, **s.labels}, s.value, s.timestamp, s.exemplar)
                                  for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)


def render_router() -> bytes:
    return generate_latest(ROUTER_REGISTRY)
