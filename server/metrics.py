"""Prometheus metrics (names and labels: shared/DESIGN.md, "Metrics").

Request metrics are prometheus-client objects the engine updates as requests move.
Expert and cache metrics are read at scrape time from where they are counted anyway:
per-layer usage from the routing recorder (the compute thread only adds to tensors, no
per-expert client calls in the forward), cache counters from the cache's own cumulative
stats, so /metrics can never drift from the runtime's numbers. Hit rate is left to
PromQL: rate(cadre_expert_cache_hits_total) / rate(cadre_expert_cache_queries_total).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LOAD_TIERS = ("host", "disk")  # always exported, so a dashboard's series exist from the start
PREFETCH_OUTCOMES = ("issued", "used", "wasted")
REJECTION_REASONS = ("queue_full", "shutting_down", "not_ready")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge("cadre_requests_running", "Requests in the running batch.", registry=r)
        self.requests_waiting = Gauge("cadre_requests_waiting", "Requests queued for a batch slot.", registry=r)
        self.rejections = Counter("cadre_request_rejections", "Requests refused before running, by reason.",
                                  ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.prompt_tokens = Counter("cadre_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("cadre_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram("cadre_time_to_first_token_seconds",
                                             "From arrival to the first generated token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("cadre_inter_token_latency_seconds",
                                             "Between consecutive tokens of a request.",
                                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("cadre_e2e_request_latency_seconds",
                                             "From arrival to the last token.", buckets=LATENCY_BUCKETS, registry=r)
        # Leak checks: both are 0 whenever the server is idle (the soak test reads them)
        self.kv_pages_used = Gauge("cadre_kv_cache_pages_used", "KV-cache pages held by requests.", registry=r)
        self.experts_pinned = Gauge("cadre_expert_cache_pinned",
                                    "Expert cache pins held (only while a forward computes).", registry=r)
        self.expert_load_seconds = Histogram("cadre_expert_load_seconds",
                                             "Time to make one expert resident (host or disk tier).",
                                             buckets=LOAD_BUCKETS, registry=r)

    def attach_runtime(self, recorder, cache, kv_pages_used) -> None:
        """Export expert and cache counters once the runtime is loaded."""
        self.registry.register(ExpertCollector(recorder, cache))
        self.kv_pages_used.set_function(kv_pages_used)
        self.experts_pinned.set_function(cache.pinned)
        # Per-load durations come from the cache's load callback (the compute thread's
        # routing events only see the total wait of a layer).
        cache.on_load = self.observe_load

    def attach_plan(self, plan) -> None:
        """Export the memory plan (fixed at start) as gauges; the host tier's fill is read at scrape time."""
        self.registry.register(PlanCollector(plan))

    def observe_load(self, key, tier: str, seconds: float) -> None:
        self.expert_load_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ExpertCollector:
    """Scrape-time view of the routing recorder's usage tensors and the cache's stats."""

    def __init__(self, recorder, cache):
        self.recorder, self.cache = recorder, cache

    def describe(self):
        return []  # names are fixed by the contract; skip the registry's duplicate check at register time

    def collect(self):
        yield from self._usage()
        yield from self._cache()

    def _usage(self):
        rec = self.recorder
        activations = CounterMetricFamily("cadre_expert_activations", "Token-expert assignments.",
                                          labels=["layer", "expert"])
        queries = CounterMetricFamily("cadre_expert_cache_queries",
                                      "Experts a layer asked the cache for (distinct per forward).", labels=["layer"])
        hits = CounterMetricFamily("cadre_expert_cache_hits",
                                   "Queries answered by a resident expert (hit or prefetched).", labels=["layer"])
        counts = rec.activations.tolist()  # [L][E]
        for row, layer in enumerate(rec.moe_layers):
            for expert, n in enumerate(counts[row]):
                activations.add_metric([str(layer), str(expert)], n)
            queries.add_metric([str(layer)], int(rec.queries[row]))
            hits.add_metric([str(layer)], int(rec.hits[row]))
        yield from (activations, queries, hits)
        yield CounterMetricFamily("cadre_router_regret", "Expert slots a lossy routing policy filled with a "
                                  "resident substitute instead of the model's choice (0 under exact routing).",
                                  value=rec.regret_total)

    def _cache(self):
        stats = self.cache.stats()
        loads = CounterMetricFamily("cadre_expert_loads", "Experts made resident, by tier read.", labels=["tier"])
        for tier in sorted(set(LOAD_TIERS) | set(stats.loads)):
            loads.add_metric([tier], stats.loads.get(tier, 0))
        prefetch = CounterMetricFamily("cadre_expert_prefetch", "Prefetches by outcome.", labels=["outcome"])
        for outcome in sorted(set(PREFETCH_OUTCOMES) | set(stats.prefetch)):
            prefetch.add_metric([outcome], stats.prefetch.get(outcome, 0))
        yield loads
        yield prefetch
        yield CounterMetricFamily("cadre_expert_evictions", "Experts evicted.", value=stats.evictions)
        yield CounterMetricFamily("cadre_expert_load_bytes", "Bytes loads moved into the cache, in the store's "
                                  "format (quantised experts move their quantised size).", value=stats.bytes_loaded)
        yield GaugeMetricFamily("cadre_expert_cache_bytes", "Bytes of resident experts.", value=stats.bytes)
        yield GaugeMetricFamily("cadre_expert_cache_capacity_bytes", "Expert cache budget.",
                                value=stats.capacity_bytes)
        host = getattr(self.cache, "host", None)
        if host is not None:  # GPU: the pinned host tier's fill, never above cadre_memory_plan_bytes{part="host_tier"}
            tier = host.stats()
            yield GaugeMetricFamily("cadre_host_tier_pinned_bytes", "Pinned host memory the tier holds.",
                                    value=tier.pinned_bytes)
            yield GaugeMetricFamily("cadre_host_tier_pinned_peak_bytes", "Most pinned host memory the tier held.",
                                    value=tier.peak_pinned_bytes)
        yield from _device_memory()


def _device_memory():
    """The CUDA caching allocator's figures (what the plan's device budget must bound)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    yield GaugeMetricFamily("cadre_device_memory_allocated_bytes", "Device memory the server's tensors hold.",
                            value=torch.cuda.memory_allocated())
    yield GaugeMetricFamily("cadre_device_memory_peak_bytes", "Most device memory the server's tensors held.",
                            value=torch.cuda.max_memory_allocated())
    yield GaugeMetricFamily("cadre_device_memory_reserved_bytes", "Device memory the allocator holds "
                            "(allocated plus its cached free blocks).", value=torch.cuda.memory_reserved())


class PlanCollector:
    """The memory plan (models.memory_plan) as gauges, in base units."""

    def __init__(self, plan):
        self.plan = plan

    def describe(self):
        return []

    def collect(self):
        plan = self.plan
        parts = GaugeMetricFamily("cadre_memory_plan_bytes", "Bytes the memory plan gives each part "
                                  "(device budget: trunk, kv_cache, workspace, expert_cache, margin; "
                                  "host_tier: the pinned host tier's cap).", labels=["part"])
        for part, nbytes in plan.parts().items():
            parts.add_metric([part], nbytes)
        budgets = GaugeMetricFamily("cadre_memory_budget_bytes", "Memory budgets the plan splits.", labels=["memory"])
        budgets.add_metric(["device"], plan.budget_bytes)
        budgets.add_metric(["host"], plan.host_budget_bytes)
        yield parts
        yield budgets
        yield GaugeMetricFamily("cadre_expert_cache_slots", "Expert slots on the device.", value=plan.expert_slots)
        yield GaugeMetricFamily("cadre_expert_cache_experts_ratio", "Expert slots over all experts of the store.",
                                value=plan.expert_fraction)
        yield GaugeMetricFamily("cadre_kv_cache_tokens", "KV cache tokens, shared by the running requests.",
                                value=plan.kv_tokens)
        yield GaugeMetricFamily("cadre_max_model_len_tokens", "Longest request (prompt + generation) accepted.",
                                value=plan.max_model_len)
        yield GaugeMetricFamily("cadre_max_concurrency", "Requests decoded together.", value=plan.max_concurrency)
