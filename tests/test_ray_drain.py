"""Autoscaling on queue depth, and a scale-down that drains: the replica Serve stops
finishes the stream it is serving before it goes."""

import threading

import httpx
import pytest

from ray_helpers import wait_until

pytestmark = pytest.mark.slow
LONG = {"prompt": "Friends, Romans, countrymen", "stream": True}
DRAINED_TOKENS = 500  # as long as the demo model's 512 positions allow: the stream must outlast the scale-down


def stream(url: str, events: list, started: threading.Event, stop: threading.Event, max_new_tokens: int,
           headers: dict | None = None) -> None:
    with httpx.stream("POST", f"{url}/generate", json={**LONG, "max_new_tokens": max_new_tokens},
                      headers=headers or {}, timeout=180) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                events.append(line[len("event: "):])
                started.set()
            if stop.is_set():
                return  # hang up: the generation is cancelled


def test_scale_up_on_queue_depth_then_down_without_dropping_a_stream(ray_serve):
    config = ray_serve.config(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0,
                              downscale_delay_s=0, look_back_period_s=0.5)
    ray_serve.deploy(config, replicas=1)
    (first,) = ray_serve.replica_ids()
    load_stop = threading.Event()
    load = [threading.Thread(target=stream, args=(ray_serve.url, [], threading.Event(), load_stop, 480))
            for _ in range(3)]
    for thread in load:
        thread.start()
    second = ray_serve.wait_for_replicas(2, timeout=150)  # 3 requests for a target of 1 per replica
    (newest,) = set(second) - {first}
    events, started = [], threading.Event()
    drained = threading.Thread(target=stream, args=(ray_serve.url, events, started, threading.Event(), DRAINED_TOKENS,
                                                    {"x-cadre-replica": newest}))
    drained.start()
    assert started.wait(60)
    load_stop.set()  # queue depth falls to the one stream: Serve stops the newest replica
    for thread in load:
        thread.join(timeout=60)
    wait_until(lambda: ray_serve.replica_ids() == [first], timeout=90, interval=0.5)
    assert "final" not in events  # out of the routing while its stream still runs: draining
    drained.join(timeout=120)
    assert events[-1] == "final" and events.count("token") == DRAINED_TOKENS  # nothing dropped
