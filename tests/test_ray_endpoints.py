"""Every endpoint of `python -m server` answers the same through Ray Serve (2 demo replicas).

Requests go through Ray's HTTP proxy, the CadreIngress and the expert-affinity router to
a CadreReplica running the server's own app; /metrics comes back labelled per replica,
with the router's decisions; a client that hangs up stops its generation.
"""

import json
import time

import httpx
import pytest

from ray_helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(ray_serve):
    ray_serve.deploy(ray_serve.config())
    return ray_serve


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        event = next((l[len("event: "):] for l in lines if l.startswith("event: ")), None)
        data = next(l[len("data: "):] for l in lines if l.startswith("data: "))
        events.append((event, data))
    return events


def test_generate_with_trace_matches_a_second_call(cluster):
    body = {"prompt": "To be, or not to be", "max_new_tokens": 6, "trace": True}
    first = httpx.post(f"{cluster.url}/generate", json=body, timeout=60)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["usage"]["completion_tokens"] == 6 and len(reply["token_ids"]) == 6
    steps = reply["trace"]["steps"]
    assert len(steps) == 6 and steps[0]["layers"][0]["cache"]
    assert {"hits", "misses", "loads", "pathways"} <= set(reply["trace"]["summary"])
    again = httpx.post(f"{cluster.url}/generate", json=body, timeout=60).json()
    assert again["token_ids"] == reply["token_ids"]  # greedy: whichever replica took it


def test_generate_streams_token_events_then_final(cluster):
    body = {"prompt": "Once upon a time", "max_new_tokens": 5, "stream": True, "trace": True}
    response = httpx.post(f"{cluster.url}/generate", json=body, timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [e for e, _ in events] == ["token"] * 5 + ["final"]
    assert json.loads(events[0][1])["layers"]
    assert json.loads(events[-1][1])["usage"]["completion_tokens"] == 5


def test_openai_endpoints(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="The king", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Speak"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Speak"}],
                                            max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 3
    raw = httpx.post(f"{cluster.url}/v1/completions", json={"model": model, "prompt": "A", "max_tokens": 2,
                                                             "stream": True}, timeout=60).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_errors_keep_their_shape(cluster):
    bad = httpx.post(f"{cluster.url}/generate", json={"prompt": ""}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    unknown = httpx.post(f"{cluster.url}/v1/completions", json={"model": "nope", "prompt": "A"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{cluster.url}/no/such/path", timeout=30).status_code == 404
    big = httpx.post(f"{cluster.url}/generate", content=b"x" * (2 << 20), timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    pinned = httpx.get(f"{cluster.url}/health", headers={"x-cadre-replica": "nobody"}, timeout=30)
    assert pinned.status_code == 404 and pinned.json()["error"]["code"] == "replica_not_found"


def test_ops_endpoints(cluster):
    assert httpx.get(f"{cluster.url}/health", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{cluster.url}/ready", timeout=30).json()["status"] == "ready"
    experts = httpx.get(f"{cluster.url}/v1/experts", timeout=30).json()
    assert experts["num_experts"] == 32 and len(experts["layers"]) == 8


def test_metrics_of_every_replica_carry_a_replica_label(cluster):
    ids = cluster.replica_ids()
    assert len(ids) == 2
    pinned = httpx.post(f"{cluster.url}/generate", json={"prompt": "Hark", "max_new_tokens": 3},
                        headers={"x-cadre-replica": ids[1]}, timeout=60)
    assert pinned.status_code == 200
    families = {f.name: f for f in cluster.scrape()}
    tokens = {s.labels["replica"]: s.value for s in families["cadre_generation_tokens"].samples
              if s.name == "cadre_generation_tokens_total"}
    assert set(tokens) == set(ids) and tokens[ids[1]] >= 3
    hits = families["cadre_expert_cache_hits"].samples
    assert {s.labels["replica"] for s in hits} == set(ids)
    assert {s.labels["layer"] for s in hits} == {str(layer) for layer in range(8)}
    decisions = {s.labels["outcome"]: s.value for s in families["cadre_router_decisions"].samples
                 if s.name == "cadre_router_decisions_total"}
    assert decisions["pinned"] >= 1 and decisions["affinity"] + decisions["balanced"] + decisions["fallback"] >= 1


def test_a_client_that_hangs_up_stops_its_generation(cluster):
    body = {"prompt": "Now is the winter", "max_new_tokens": 400, "stream": True}
    tokens_before = cluster.total("cadre_generation_tokens_total")
    with httpx.stream("POST", f"{cluster.url}/generate", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(l for l in lines if l.startswith("event: token"))
    # the proxy cancels the ingress's call, which cancels the replica's: the batch slot frees
    wait_until(lambda: cluster.total("cadre_requests_running") == 0, timeout=15, interval=0.2)
    settled = cluster.total("cadre_generation_tokens_total")
    time.sleep(1.0)  # dozens of decode steps, had generation gone on
    assert cluster.total("cadre_generation_tokens_total") == settled
    assert settled - tokens_before < 400
