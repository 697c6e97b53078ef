"""End to end without Docker: what `docker compose up` runs, on loopback.

The real server (compose_helpers.server_command, the container's ENTRYPOINT + CMD) serving
a tiny Qwen3-MoE store that the test extracts with `python -m extractor`, as the compose
extractor service would (with a small word-level tokenizer, so prompts are text); a real
Prometheus (Debian's binary) scraping it with docker/prometheus/prometheus.yml adapted to
loopback (targets rewritten, 1 s interval); /generate and /v1/completions traffic plus a
burst past the queue; then every PromQL query of the provisioned dashboard, Grafana
variables interpolated, evaluated through Prometheus' HTTP API: each must return data with
a finite value, and the panels the traffic drives must show it. About 15 s on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from compose_helpers import PROMETHEUS_CONFIG, REPO, dashboard_module, load_yaml, server_command, tool
from tiny_models import make_checkpoint

SCRAPE_INTERVAL = "1s"
# What Grafana substitutes: $__rate_interval is at least 4 scrape intervals; both windows
# here are wide enough to hold every sample of the run.
RATE_INTERVAL, RANGE = "30s", "5m"
TRAFFIC_SECONDS = 4.0  # sequential requests spanning several scrapes, so rates are not 0
SERVER_READY_TIMEOUT = 120.0  # generous: a shared CI machine can be slow to load torch
dash = dashboard_module()


@dataclass
class Stack:
    server: str  # base URLs
    prometheus: str
    logs: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(argv: list[str], log: Path, env: dict | None = None):
    """A child process that is stopped (TERM, then KILL) however the test ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if result := check():
                return result
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


PROMPTS = ["to be or not to be", "now is the winter of our discontent", "friends romans countrymen",
           "all the world's a stage", "o romeo romeo"]


def tiny_store(root: Path) -> Path:
    """A tiny random Qwen3-MoE checkpoint (16 experts, 3 layers, vocabulary 128) with a
    word-level tokenizer over the prompts' words, extracted by the extractor's CLI."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    checkpoint = make_checkpoint(root / "tiny-qwen3", "qwen3_moe")
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for word in " ".join(PROMPTS).split():
        vocab.setdefault(word, len(vocab))
    vocab.update({f"w{i}": i for i in range(len(vocab), 128)})  # every id the model can emit decodes
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(checkpoint)
    store = root / "stores" / checkpoint.name
    subprocess.run([sys.executable, "-m", "extractor", "--model", str(checkpoint), "--out", str(store), "--quiet"],
                   cwd=REPO, check=True, timeout=120)
    return store


def server_env(store: Path, cache_dir: Path) -> dict:
    """Configuration by CADRE_* variables, as in the container. A quarter of the experts
    fit the cache, so loads and evictions go on during traffic; a short queue, so a burst
    is turned away."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADRE_")}
    env.update(CADRE_STORE=str(store), CADRE_CACHE_DIR=str(cache_dir), CADRE_DEVICE="cpu",
               CADRE_CACHE_FRACTION="0.25", CADRE_MAX_CONCURRENCY="2", CADRE_MAX_QUEUE="1",
               CADRE_LOG_LEVEL="warning")
    return env


def loopback_config(server_port: int, prometheus_port: int) -> dict:
    """The repository's Prometheus config with compose's service names replaced by
    loopback addresses and a 1 s interval; everything else as shipped."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    loopback = {"cadre:8000": f"127.0.0.1:{server_port}", "localhost:9090": f"127.0.0.1:{prometheus_port}"}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [loopback[target] for target in static["targets"]]
    return config


def cadre_target_up(prometheus: str) -> bool:
    reply = httpx.get(f"{prometheus}/api/v1/targets", timeout=5)
    if reply.status_code != 200:  # a starting Prometheus answers 503 in plain text
        return False
    targets = reply.json()["data"]["activeTargets"]
    return any(t["labels"]["job"] == "cadre" and t["health"] == "up" for t in targets)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard-e2e")
    server_port, prometheus_port = free_port(), free_port()
    argv = server_command("127.0.0.1", server_port)
    argv[0] = sys.executable  # `python` in the image is its venv's; here, this venv's
    server_log, prometheus_log = tmp / "server.log", tmp / "prometheus.log"
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(loopback_config(server_port, prometheus_port)))
    server_url, prometheus_url = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{prometheus_port}"

    # Prometheus starts first (~5 s to its first scrape here) while the store is extracted and the
    # server loads; until the server answers, its scrapes fail (no panel reads `up`).
    prometheus_argv = [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"]
    with running(prometheus_argv, prometheus_log) as prometheus:
        with running(argv, server_log, server_env(tiny_store(tmp), tmp / "cache")) as server:
            wait_for("server /ready", lambda: httpx.get(f"{server_url}/ready", timeout=5).status_code == 200,
                     SERVER_READY_TIMEOUT, server, server_log)
            wait_for("prometheus scraping cadre", lambda: cadre_target_up(prometheus_url), 20, prometheus,
                     prometheus_log)
            yield Stack(server_url, prometheus_url, tmp)


def send_traffic(server: str) -> None:
    with httpx.Client(base_url=server, timeout=120) as client:  # a busy shared machine is slow
        model = client.get("/v1/models").json()["data"][0]["id"]
        deadline, i = time.monotonic() + TRAFFIC_SECONDS, 0
        while time.monotonic() < deadline or i < 4:
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 2 == 0:
                reply = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0})
            else:
                reply = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8})
            assert reply.status_code == 200, reply.text
            i += 1

        def one(n: int) -> int:  # the burst: more requests than slots + queue
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_new_tokens": 24}
            return client.post("/generate", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes, "the burst should overflow 2 slots + a queue of 1"


def server_counter(server: str, name: str) -> float:
    for line in httpx.get(f"{server}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_every_panel_query_returns_data(stack):
    send_traffic(stack.server)
    prom = dash.Prometheus(stack.prometheus)

    # Query once Prometheus holds the server's final counts (the scrape after the traffic).
    generated = server_counter(stack.server, "cadre_generation_tokens_total")
    assert generated > 0

    def scraped_all() -> bool:
        result = prom.query("cadre_generation_tokens_total")
        return bool(result) and float(result[0]["value"][1]) == generated

    deadline = time.monotonic() + 10
    while not scraped_all():
        assert time.monotonic() < deadline, "Prometheus never scraped the final counts"
        time.sleep(0.25)
    at = time.time()

    evaluated, failures = dash.check_panels(prom, at, RATE_INTERVAL, RANGE)
    assert not failures, "\n".join(failures)
    assert evaluated >= len(dash.panel_queries(dash.load()))
