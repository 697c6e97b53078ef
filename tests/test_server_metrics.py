"""/metrics, parsed with prometheus-client's own parser: every contract metric (shared/DESIGN.md)
is there with its labels and moves with traffic; /v1/experts agrees with it."""

import math
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_live import serve, tiny_runtime

# family name (as the parser reports it) -> (type, label names)
CONTRACT = {
    "cadre_expert_activations": ("counter", {"layer", "expert"}),
    "cadre_expert_cache_queries": ("counter", {"layer"}),
    "cadre_expert_cache_hits": ("counter", {"layer"}),
    "cadre_expert_loads": ("counter", {"tier"}),
    "cadre_expert_load_seconds": ("histogram", set()),
    "cadre_expert_evictions": ("counter", set()),
    "cadre_expert_cache_bytes": ("gauge", set()),
    "cadre_expert_cache_capacity_bytes": ("gauge", set()),
    "cadre_expert_prefetch": ("counter", {"outcome"}),
    "cadre_router_regret": ("counter", set()),
    "cadre_requests_running": ("gauge", set()),
    "cadre_requests_waiting": ("gauge", set()),
    "cadre_request_rejections": ("counter", {"reason"}),
    "cadre_prompt_tokens": ("counter", set()),
    "cadre_generation_tokens": ("counter", set()),
    "cadre_time_to_first_token_seconds": ("histogram", set()),
    "cadre_inter_token_latency_seconds": ("histogram", set()),
    "cadre_e2e_request_latency_seconds": ("histogram", set()),
}
# exact routing never substitutes; nothing queues at this load; the budget is fixed and the
# cache already full from the warm-up generation (checked to be set, not to move)
STILL_UNDER_THIS_TRAFFIC = {"cadre_router_regret", "cadre_requests_waiting", "cadre_expert_cache_capacity_bytes",
                            "cadre_expert_cache_bytes"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-metrics"))
    with serve(runtime, max_concurrency=2, max_queue=0) as server:
        server.wait_ready()
        server.runtime = runtime
        yield server
    runtime.close()


def families(live) -> dict:
    text = httpx.get(f"{live.url}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def total(family) -> float:
    """A family's movement: summed counter samples, a histogram's count, a gauge's value."""
    if family.type == "histogram":
        return sum(s.value for s in family.samples if s.name.endswith("_count"))
    return sum(s.value for s in family.samples if not s.name.endswith("_created"))


def test_every_contract_metric_is_exported_with_its_labels(live):
    found = families(live)
    for name, (kind, labels) in CONTRACT.items():
        assert name in found, f"{name} missing"
        assert found[name].type == kind, name
        samples = [s for s in found[name].samples if not s.name.endswith("_created")]
        assert samples, name
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    layers = {s.labels["layer"] for s in found["cadre_expert_activations"].samples}
    assert layers == {str(layer) for layer in live.runtime.store.moe_layers}


def test_every_contract_metric_moves_with_traffic(live):
    before = {name: total(f) for name, f in families(live).items()}
    running_seen = threading.Event()

    def watch_running():
        for _ in range(500):
            if families(live)["cadre_requests_running"].samples[0].value > 0:
                running_seen.set()
                return

    watcher = threading.Thread(target=watch_running)
    watcher.start()
    for prompt in ("hello world", "the cat sat on the mat", "zebra quartz"):
        assert httpx.post(f"{live.url}/generate", json={"prompt": prompt, "max_new_tokens": 12},
                          timeout=60).status_code == 200
    watcher.join()
    # fill both slots with no queue allowed: the third is refused
    with httpx.stream("POST", f"{live.url}/generate", json={"prompt": "a", "max_new_tokens": 200, "stream": True},
                      timeout=60) as one, \
         httpx.stream("POST", f"{live.url}/generate", json={"prompt": "b", "max_new_tokens": 200, "stream": True},
                      timeout=60) as two:
        streams = [one.iter_lines(), two.iter_lines()]  # held: a dropped iterator closes its response
        assert all(next(lines).startswith("event: token") for lines in streams)
        refused = httpx.post(f"{live.url}/generate", json={"prompt": "c", "max_new_tokens": 2})
        assert refused.status_code == 503
    after = families(live)
    moved = {name for name in CONTRACT if total(after[name]) != before.get(name, 0.0)}
    gauges_that_rose = {"cadre_requests_running"} if running_seen.is_set() else set()
    assert moved | gauges_that_rose >= set(CONTRACT) - STILL_UNDER_THIS_TRAFFIC, \
        set(CONTRACT) - STILL_UNDER_THIS_TRAFFIC - moved - gauges_that_rose
    assert total(after["cadre_router_regret"]) == 0.0  # exact routing substitutes nothing
    assert 0 < total(after["cadre_expert_cache_bytes"]) <= total(after["cadre_expert_cache_capacity_bytes"])
    rejections = {s.labels["reason"]: s.value for s in after["cadre_request_rejections"].samples
                  if s.name.endswith("_total")}
    assert rejections["queue_full"] == 1.0


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-lossy"), routing="cache-aware")
    with serve(runtime) as server:
        server.wait_ready()
        server.runtime = runtime
        yield server
    runtime.close()


def test_regret_counts_the_substitutions_of_a_lossy_policy(lossy):
    body = httpx.post(f"{lossy.url}/generate", json={"prompt": "the cat sat on the mat", "max_new_tokens": 16,
                                                      "trace": True}, timeout=60).json()
    substitutions = lossy.runtime.policy.regret
    assert substitutions > 0  # half the experts resident: some choices have a close resident alternative
    assert 0 < body["trace"]["summary"]["regret"] <= substitutions
    assert total(families(lossy)["cadre_router_regret"]) == substitutions


def test_cache_metrics_agree_with_the_runtime_and_experts_endpoint(live):
    found = families(live)
    stats = live.runtime.cache.stats()
    loads = {s.labels["tier"]: s.value for s in found["cadre_expert_loads"].samples if s.name.endswith("_total")}
    assert sum(loads.values()) == sum(stats.loads.values())
    assert total(found["cadre_expert_load_seconds"]) == sum(stats.loads.values())  # one observation per load
    assert total(found["cadre_expert_evictions"]) == stats.evictions
    assert total(found["cadre_expert_load_bytes"]) == stats.bytes_loaded > 0  # beyond the contract: bytes moved
    assert total(found["cadre_expert_cache_capacity_bytes"]) == stats.capacity_bytes
    assert 0 < total(found["cadre_expert_cache_bytes"]) <= stats.capacity_bytes
    report = httpx.get(f"{live.url}/v1/experts").json()
    assert report["cache"]["capacity_bytes"] == stats.capacity_bytes
    by_layer = {entry["layer"]: entry for entry in report["layers"]}
    for sample in found["cadre_expert_activations"].samples:
        if sample.name.endswith("_total"):
            entry = by_layer[int(sample.labels["layer"])]
            assert entry["activations"][int(sample.labels["expert"])] == sample.value
    for entry in report["layers"]:
        assert set(entry["resident"]) <= set(entry["present"])
        assert entry["cache_hits"] <= entry["cache_queries"]
    routing = report["routing"]  # router.analytics over the recent window, SNARC usage signals
    assert routing["window_tokens"] > 0 and routing["distinct_pathways"] >= 1
    num_experts = report["num_experts"]
    for layer, analytics in routing["layers"].items():
        assert 0 < analytics["entropy"] <= math.log(num_experts) + 1e-9
        assert 0 < analytics["utilisation"] <= 1
        assert len(analytics["novelty"]) == len(analytics["reward"]) == num_experts
        assert all(0 < n <= 1 for n in analytics["novelty"]) and all(r >= 0 for r in analytics["reward"])
