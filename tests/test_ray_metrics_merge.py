"""server.ray.metrics: replicas' expositions merge into one, every sample labelled with its
replica, one HELP/TYPE per family, counters still counters."""

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from server.ray.metrics import merge_replicas


def exposition(tokens: int) -> str:
    metrics = Metrics()
    metrics.generation_tokens.inc(tokens)
    metrics.rejections.labels("queue_full").inc()
    metrics.e2e_request_latency.observe(0.3)
    return metrics.render().decode()


def test_every_sample_is_labelled_and_families_merge():
    merged = merge_replicas({"a": exposition(3), "b": exposition(5)}).decode()
    assert merged.count("# TYPE cadre_generation_tokens_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    tokens = {s.labels["replica"]: s.value for s in families["cadre_generation_tokens"].samples
              if s.name == "cadre_generation_tokens_total"}
    assert tokens == {"a": 3.0, "b": 5.0}
    assert families["cadre_generation_tokens"].type == "counter"
    rejections = [s for s in families["cadre_request_rejections"].samples if s.name.endswith("_total")]
    assert {(s.labels["replica"], s.labels["reason"]) for s in rejections if s.value} == {("a", "queue_full"),
                                                                                         ("b", "queue_full")}
    buckets = [s for s in families["cadre_e2e_request_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"a", "b"} and all("le" in s.labels for s in buckets)


def test_no_replica_is_an_empty_exposition():
    assert merge_replicas({}) == b""
