"""The server under its memory plan: gauges on /metrics, the plan in /v1/experts and in one log
line, the KV pages and admission it sets, and budgets refused before loading (exit 2)."""

import logging
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app, memory_plan
from server.config import ServerConfig
from server.engine import PAGE_SIZE
from server_live import MODEL_NAME, LiveServer, serve, tiny_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = {"trunk", "kv_cache", "workspace", "expert_cache", "margin", "host_tier"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-plan"))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def live(runtime):
    with serve(runtime, max_concurrency=2, max_queue=4) as server:
        server.wait_ready()
        yield server


def gauges(url: str) -> dict:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for name, f in families.items() if name.startswith("cadre_") for s in f.samples}


def test_the_plan_is_exported_as_gauges(live, runtime):
    plan = live.server.config.app.state.cadre.plan
    values = gauges(live.url)
    parts = {dict(labels)["part"]: v for (name, labels), v in values.items() if name == "cadre_memory_plan_bytes"}
    assert set(parts) == PARTS and parts == {k: float(v) for k, v in plan.parts().items()}
    assert values[("cadre_expert_cache_slots", ())] == runtime.cache.num_slots == plan.expert_slots
    assert values[("cadre_kv_cache_tokens", ())] == plan.kv_tokens == 2 * 256  # both given: 2 x 256
    assert values[("cadre_max_model_len_tokens", ())] == 256
    assert values[("cadre_max_concurrency", ())] == 2
    assert values[("cadre_expert_cache_experts_ratio", ())] == pytest.approx(plan.expert_fraction)
    assert values[("cadre_memory_budget_bytes", (("memory", "device"),))] == plan.budget_bytes


def test_the_plan_is_in_v1_experts(live):
    body = httpx.get(f"{live.url}/v1/experts").json()
    plan = body["memory_plan"]
    assert set(plan["parts"]) == PARTS and plan["kv_tokens"] == 512 and plan["max_concurrency"] == 2
    assert 0 < plan["expert_fraction"] <= 1 and body["host_tier"] is None  # CPU: no pinned tier


def test_the_kv_pages_follow_the_plan(live):
    engine = live.server.config.app.state.cadre.engine
    assert engine.config.kv_pages == math.ceil(512 / PAGE_SIZE)
    cache = engine.manager.batch_processor.cache
    assert engine.config.kv_pages <= cache.num_blocks < 2 * engine.config.kv_pages  # transformers rounds up a little


def test_the_plan_is_logged_once_as_one_structured_line(runtime, caplog):
    with caplog.at_level(logging.INFO, logger="cadre.server"):
        with serve(runtime, max_concurrency=1, max_model_len=128) as server:
            server.wait_ready()
            plan = server.server.config.app.state.cadre.plan
            httpx.post(f"{server.url}/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=60)
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "memory_plan"]
    assert len(lines) == 1
    fields = lines[0].fields
    assert fields["kv_tokens"] == plan.kv_tokens == 128 and fields["expert_slots"] == plan.expert_slots
    assert fields["summary"].startswith("memory plan (cpu") and "expert_cache" in fields["summary"]


def test_admission_keeps_running_requests_within_the_kv_tokens(runtime):
    """KV for 256 tokens, 4 slots: two requests of 3 pages each cannot run together."""
    config = ServerConfig(served_model_name=MODEL_NAME, device="cpu", max_model_len=256, max_concurrency=4)
    plan = replace(memory_plan(config, runtime), kv_tokens=256)
    app = create_app(config, runtime=runtime, plan=plan)
    with LiveServer(app) as server:
        server.wait_ready()
        engine = app.state.cadre.engine
        seen = []
        body = {"prompt": "to be or not", "max_new_tokens": 150, "temperature": 0}
        replies = []
        clients = [threading.Thread(target=lambda: replies.append(httpx.post(f"{server.url}/generate", json=body,
                                                                             timeout=120)))
                   for _ in range(2)]
        for client in clients:
            client.start()
        while any(c.is_alive() for c in clients):
            seen.append((engine.num_running, engine.num_waiting))
            time.sleep(0.005)
        for client in clients:
            client.join()
    assert [r.status_code for r in replies] == [200, 200]
    assert max(running for running, _ in seen) == 1  # never both: 3 + 3 pages > 4
    assert (1, 1) in seen  # the second waited for the first


def test_a_plan_that_cannot_fit_exits_2_before_loading():
    result = subprocess.run([sys.executable, "-m", "server", "--device", "cpu", "--port", "0", "--gpu-memory",
                             "1MiB"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "memory plan does not fit: the trunk needs" in lines[0], result.stderr


@pytest.mark.parametrize("args, named", [
    (["--max-model-len", "100000"], "--max-model-len 100000 exceeds the model's context of 512 tokens"),
    (["--gpu-memory", "lots"], "--gpu-memory 'lots': not a size"),
])
def test_bad_plan_options_exit_2_with_one_line(args, named, capsys):
    """The CLI's own steps in this process, up to the plan (the test above runs the process)."""
    from server.cli import parse_config, plan_or_exit

    with pytest.raises(SystemExit) as exit_:
        plan_or_exit(parse_config(["--device", "cpu", "--port", "0", *args]))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_a_store_that_vanishes_while_serving_is_a_503_not_a_hang(tmp_path):
    """A miss after the store's directory is gone: the request gets 503 naming the store, later
    requests 503 at once (the generation loop stopped), nothing waits forever."""
    _, runtime = tiny_runtime(tmp_path, cache_fraction=0.25)
    try:
        with serve(runtime, max_concurrency=1) as server:
            server.wait_ready()
            store = runtime.store.root
            store.rename(tmp_path / "moved-away")
            first = httpx.post(f"{server.url}/generate", json={"prompt": "the king", "max_new_tokens": 24},
                               timeout=60)
            assert first.status_code == 503, first.text
            assert "expert store unavailable" in first.json()["error"]["message"]
            second = httpx.post(f"{server.url}/generate", json={"prompt": "a", "max_new_tokens": 2}, timeout=60)
            assert second.status_code == 503
    finally:
        runtime.close()
