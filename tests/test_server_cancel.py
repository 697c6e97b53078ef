"""A client that disconnects mid-generation frees its slot, and its generation stops.

"Stops" is checked where work happens: after the slot is freed, no forward runs (the
per-expert activation counters, fed by every MoE layer of every forward, stand still).
"""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_live import ENGINES, serve, tiny_runtime


@pytest.fixture(scope="module", params=list(ENGINES))
def live(tmp_path_factory, request):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-cancel"))
    with serve(runtime, max_concurrency=2, **ENGINES[request.param]) as server:
        server.wait_ready()
        yield server
    runtime.close()


def scrape(live) -> dict[str, float]:
    """Sample name -> value, activations summed over layer and expert."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{live.url}/metrics").text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


MAX_NEW = 240  # seconds of work on this model: a generation that ran to the end would show


def _settled(live) -> bool:
    first = scrape(live)["cadre_expert_activations_total"]
    time.sleep(0.1)
    return scrape(live)["cadre_expert_activations_total"] == first


def assert_idle_and_still(live, tokens_before: float) -> None:
    wait_until(lambda: scrape(live)["cadre_requests_running"] == 0, timeout=1.0)
    # the forward already running when the cancel came finishes (its token is dropped);
    # on a loaded machine one forward can outlast a fixed pause, so wait for it to settle
    wait_until(lambda: _settled(live), timeout=3.0)
    before = scrape(live)
    assert before["cadre_generation_tokens_total"] - tokens_before < MAX_NEW
    time.sleep(0.5)  # dozens of decode steps at this model's speed, had generation continued
    after = scrape(live)
    assert after["cadre_expert_activations_total"] == before["cadre_expert_activations_total"]
    assert after["cadre_generation_tokens_total"] == before["cadre_generation_tokens_total"]


def test_streaming_client_disconnect_frees_the_slot(live):
    tokens_before = scrape(live)["cadre_generation_tokens_total"]
    request = {"prompt": "hello", "max_new_tokens": MAX_NEW, "stream": True, "trace": True}
    with httpx.stream("POST", f"{live.url}/generate", json=request, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines)]
        assert any(line.startswith("data: ") for line in received)
        assert scrape(live)["cadre_requests_running"] == 1
    # leaving the block closed the connection mid-stream
    assert_idle_and_still(live, tokens_before)


def test_non_streaming_client_disconnect_frees_the_slot(live):
    tokens_before = scrape(live)["cadre_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/generate", json={"prompt": "hello", "max_new_tokens": MAX_NEW}, timeout=0.3)
    assert_idle_and_still(live, tokens_before)


def test_slots_serve_new_requests_after_cancellations(live):
    response = httpx.post(f"{live.url}/generate", json={"prompt": "hello", "max_new_tokens": 4}, timeout=60)
    assert response.status_code == 200 and len(response.json()["token_ids"]) == 4
