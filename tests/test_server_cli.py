"""`python -m server`: flags and CADRE_* variables, one-line errors, and the real process end
to end (serve, log one JSON line per request, finish in-flight work on SIGTERM, exit 0)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server.cli import parse_config
from server_live import tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_server(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60, **kwargs)


def test_flags_beat_environment_beats_defaults(tmp_path):
    assert parse_config([], environ={}).port == 8000
    env = {"CADRE_PORT": "9001", "CADRE_MAX_CONCURRENCY": "3", "CADRE_API_KEY": "k", "CADRE_AUTH_EXEMPT": "/health",
           "CADRE_CACHE_FRACTION": "0.25", "CADRE_DEVICE": "cpu", "CADRE_LOG_LEVEL": ""}
    config = parse_config([], environ=env)
    assert (config.port, config.max_concurrency, config.api_key, config.auth_exempt) == (9001, 3, "k", ("/health",))
    assert (config.cache_fraction, config.device, config.log_level) == (0.25, "cpu", "info")  # "" = unset
    assert parse_config(["--port", "9002"], environ=env).port == 9002


def test_policies_reach_the_runtime():
    from server.app import runtime_config

    config = parse_config(["--eviction", "layer-lru", "--routing", "dynamic-k", "--device", "cpu"], environ={})
    runtime = runtime_config(config)
    assert (runtime.eviction, runtime.routing) == ("layer-lru", "dynamic-k")
    assert runtime_config(parse_config([], environ={})).eviction == "layer-lru"  # batches: see README, Router


@pytest.mark.parametrize("args,env,named", [
    (["--port", "abc"], {}, "--port"),
    (["--max-concurrency", "0"], {}, "--max-concurrency"),
    (["--device", "tpu"], {}, "--device"),
    (["--cache-bytes", "10", "--cache-fraction", "0.5"], {}, "--cache-fraction"),
    (["--cache-fraction", "1.5"], {}, "--cache-fraction"),
    (["--store", "/nonexistent/store"], {}, "/nonexistent/store"),
    (["--model", "/nonexistent/ckpt"], {}, "/nonexistent/ckpt"),
    (["--bogus"], {}, "--bogus"),
    (["--routing", "magic"], {}, "--routing"),
    (["--eviction", "fifo"], {}, "--eviction"),
    ([], {"CADRE_EVICTION": "mru"}, "--eviction mru"),
    ([], {"CADRE_PORT": "eighty"}, "CADRE_PORT"),
    ([], {"CADRE_DEVICE": "tpu"}, "CADRE_DEVICE"),
])
def test_bad_flags_exit_2_with_one_line(args, env, named):
    result = run_server(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_process_serves_logs_and_shuts_down_gracefully(tmp_path):
    from extractor import extract_store

    extract_store(tiny_checkpoint(tmp_path / "checkpoint"), tmp_path / "store", quiet=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--device", "cpu"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CADRE_STORE": str(tmp_path / "store"), "CADRE_MAX_MODEL_LEN": "128"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 3}).status_code == 200
        for _ in range(20):  # once 500s that each leaked a batch slot, and made SIGTERM hang and raise
            bad = {"prompt": "x", "max_new_tokens": 2, "temperature": 1, "seed": 2**64}
            assert httpx.post(f"{url}/generate", json=bad).status_code == 400
        request = {"prompt": "hello", "max_new_tokens": 30, "stream": True}
        with httpx.stream("POST", f"{url}/generate", json=request, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("event: token")
            process.send_signal(signal.SIGTERM)  # mid-stream: the request still finishes
            events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
        assert events[-1]["finish_reason"] == "length" and len(events[-1]["token_ids"]) == 30
        # uvicorn re-raises the signal once its shutdown is complete, so the parent sees how it ended
        assert process.wait(timeout=60) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read()
    assert "Traceback" not in stderr and "Error" not in stderr.replace('"level": "error"', ""), stderr
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    requests = [entry for entry in logged if entry.get("event") == "request"]
    assert [r["completion_tokens"] for r in requests] == [3, 30]
    for entry in requests:
        assert {"id", "prompt_tokens", "completion_tokens", "latency_s", "hits", "misses"} <= set(entry)
        assert entry["hits"] + entry["misses"] > 0
    assert any(entry.get("event") == "stopped" for entry in logged)  # the lifespan's drain ran to its end


def test_a_busy_port_fails_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = run_server("--port", str(port), "--device", "cpu")  # the demo model: seconds to load
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}" in lines[0] and "in use" in lines[0], result.stderr
    assert time.monotonic() - started < 20  # no model was loaded (python + imports only)


def test_a_model_that_fails_to_load_makes_the_process_exit_non_zero(tmp_path):
    from extractor import extract_store

    extract_store(tiny_checkpoint(tmp_path / "checkpoint"), tmp_path / "store", quiet=True)
    (tmp_path / "store" / "trunk.safetensors").write_bytes(b"not a safetensors file")
    result = run_server("--port", str(free_port()), "--device", "cpu", "--store", str(tmp_path / "store"))
    assert result.returncode == 1, result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    failed = [entry for entry in logged if entry.get("event") == "load_failed"]
    assert len(failed) == 1 and "trunk.safetensors" in failed[0]["error"]
