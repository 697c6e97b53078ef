"""/ready answers 503 whenever the engine cannot make progress -- its batching loop died, or
no generation step completed for --stall-timeout seconds while requests were in flight --
so an orchestrator stops sending it traffic; it turns 200 again once steps resume."""

import threading
import time

import httpx
import pytest

from server_live import serve, tiny_runtime

STALL_TIMEOUT = 0.5


@pytest.fixture
def live(tmp_path):
    _, runtime = tiny_runtime(tmp_path)
    with serve(runtime, stall_timeout=STALL_TIMEOUT) as server:
        server.wait_ready()
        server.engine = server.server.config.app.state.cadre.engine
        yield server
    runtime.close()


def ready(live) -> httpx.Response:
    return httpx.get(f"{live.url}/ready", timeout=10)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ready_turns_503_when_the_engine_loop_is_stopped(live):
    assert ready(live).status_code == 200
    live.engine.manager.stop(block=True, timeout=30)
    response = ready(live)
    assert response.status_code == 503, response.text
    assert response.json()["status"] == "stalled" and "loop stopped" in response.json()["detail"]
    assert httpx.get(f"{live.url}/health").status_code == 503
    refused = httpx.post(f"{live.url}/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"


def test_ready_turns_503_while_no_step_completes_and_recovers(live):
    done = {}

    def request():
        done["response"] = httpx.post(f"{live.url}/generate", json={"prompt": "hi", "max_new_tokens": 3}, timeout=60)

    with live.engine.manager.pause():  # the loop parks between steps: nothing completes
        worker = threading.Thread(target=request)
        worker.start()
        time.sleep(STALL_TIMEOUT * 3)
        response = ready(live)
        assert response.status_code == 503, response.text
        assert "no generation step completed" in response.json()["detail"]
    worker.join(timeout=60)
    assert done["response"].status_code == 200
    wait_for(lambda: ready(live).status_code == 200)


def test_an_idle_engine_is_never_stalled(live):
    time.sleep(STALL_TIMEOUT * 3)
    assert ready(live).status_code == 200
