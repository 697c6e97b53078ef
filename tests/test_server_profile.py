"""POST /debug/profile (--enable-profiling): where every server thread spent the sampled
seconds, as collapsed stacks; absent unless enabled; bad `seconds` refused in the error shape."""

import threading

import httpx
import pytest

from server_live import serve, tiny_runtime


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("profile"))
    yield runtime
    runtime.close()


def test_a_profile_sees_the_compute_thread_generate(runtime):
    with serve(runtime, enable_profiling=True) as live:
        live.wait_ready()
        busy = threading.Thread(target=lambda: [httpx.post(f"{live.url}/generate", timeout=60, json={
            "prompt": "hello world", "max_new_tokens": 60}) for _ in range(6)])
        busy.start()
        profile = httpx.post(f"{live.url}/debug/profile", params={"seconds": 1.0}, timeout=30)
        busy.join()
        bad = httpx.post(f"{live.url}/debug/profile", params={"seconds": 0}, timeout=30)
    assert profile.status_code == 200 and profile.headers["content-type"].startswith("text/plain")
    lines = profile.text.splitlines()
    stacks = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in lines}
    assert all(count > 0 for count in stacks.values())
    # the generation, seen in cadre's experts on the engine's thread; paths short, from their roots
    assert any("models/experts.py:__call__:" in s and not s.startswith("MainThread") for s in stacks), lines[:5]
    assert any(";threading.py:" in s for s in stacks) and not any(";/" in s for s in stacks), lines[:5]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seconds"


def test_no_profile_route_unless_enabled(runtime):
    with serve(runtime) as live:
        live.wait_ready()
        assert httpx.post(f"{live.url}/debug/profile", params={"seconds": 0.1}).status_code == 404
