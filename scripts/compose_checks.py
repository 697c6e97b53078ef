"""The checks of scripts/compose_smoke.sh, run from the host against the compose stack's
ports on 127.0.0.1. One line per check ("ok ..." or "FAIL ..."); exit 1 if any failed.

    python scripts/compose_checks.py stack --cadre URL --prometheus URL
        /ready; POST /generate with trace=true; an OpenAI chat completion; /metrics holds
        every contract metric; Prometheus scrapes cadre (up == 1); after traffic (and a
        burst past the queue), every query of the Grafana dashboard has a finite,
        non-empty result, and the panels traffic drives are above zero.
    python scripts/compose_checks.py store --cadre URL --model NAME --experts N
        the server serves the extracted store NAME holding experts 0..N-1 of every
        layer: /v1/models, /v1/experts, and a traced /generate that routes to no other.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO.\n", "To be, or not to be", "MACBETH.\n", "KING.\nMy lords,", "Now is the winter"]
TRAFFIC_SECONDS = 20.0  # spans 4 of Prometheus' 5 s scrapes, so every rate has two samples
# What $__rate_interval and $__range become: windows that hold the whole run, so a rate is
# not 0 because a busy machine stretched the time between the burst and the final scrape
# (what is checked is that every query returns data, not Grafana's choice of window).
RATE_INTERVAL, RANGE = "5m", "10m"
TRACE_TOKENS = 8


class Checks:
    """Runs named checks; a failing one is reported and counted, the rest still run."""

    def __init__(self):
        self.failed = 0

    def run(self, name: str, check) -> object:
        try:
            detail = check()
        except Exception as exc:  # noqa: BLE001 -- any exception is this check's failure
            self.failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            return None
        print(f"ok   {name}" + (f": {detail}" if detail else ""), flush=True)
        return detail


def dashboard_module():
    spec = importlib.util.spec_from_file_location("cadre_dashboard", REPO / "docker" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wait_until(what: str, probe, timeout: float) -> float:
    """Seconds until probe() is true; raises after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if probe():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def check_ready(cadre: httpx.Client, timeout: float) -> str:
    seconds = wait_until("/ready", lambda: cadre.get("/ready").status_code == 200, timeout)
    return f"200 after {seconds:.0f} s"


def check_generate_trace(cadre: httpx.Client) -> str:
    body = {"prompt": PROMPTS[0], "max_new_tokens": TRACE_TOKENS, "temperature": 0, "trace": True}
    reply = cadre.post("/generate", json=body)
    assert reply.status_code == 200, f"HTTP {reply.status_code}: {reply.text[:300]}"
    out = reply.json()
    steps, n = out["trace"]["steps"], len(out["token_ids"])
    assert n == out["usage"]["completion_tokens"] > 0 and len(steps) == n, (n, len(steps))
    layers = {len(step["layers"]) for step in steps}
    assert len(layers) == 1 and layers.pop() > 0, layers
    for step in steps:
        for layer in step["layers"]:
            assert len(layer["experts"]) == len(layer["weights"]) == len(layer["cache"]) > 0, layer
    summary = out["trace"]["summary"]
    return f"{n} tokens, {len(steps[0]['layers'])} MoE layers per step, summary hits {summary['hits']} misses {summary['misses']}"


def check_chat(cadre: httpx.Client) -> str:
    model = cadre.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Speak, Horatio."}]}
    reply = cadre.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, f"HTTP {reply.status_code}: {reply.text[:300]}"
    out = reply.json()
    message = out["choices"][0]["message"]
    assert out["object"] == "chat.completion" and message["role"] == "assistant", out
    assert isinstance(message["content"], str) and out["usage"]["completion_tokens"] > 0, out
    return f"model {model!r}, {out['usage']['completion_tokens']} tokens, finish_reason {out['choices'][0]['finish_reason']}"


def check_metrics(cadre: httpx.Client, contract: dict[str, str]) -> str:
    text = cadre.get("/metrics").text
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    missing = [name for name in contract if name.removesuffix("_total") not in types and name not in types]
    assert not missing, f"not in /metrics: {missing}"
    return f"all {len(contract)} contract metrics"


def check_scraped(prom) -> str:
    def up() -> bool:
        result = prom.query('up{job="cadre"}')
        return bool(result) and float(result[0]["value"][1]) == 1

    seconds = wait_until('Prometheus up{job="cadre"} == 1', up, 60)
    return f'up{{job="cadre"}} == 1 after {seconds:.0f} s'


def traffic(cadre: httpx.Client) -> str:
    """Sequential /generate, completions and chat requests, then a burst of 8 past the
    server's 2 slots + queue of 1 (the smoke test sets those), so rejections show."""
    model = cadre.get("/v1/models").json()["data"][0]["id"]
    deadline, sent = time.monotonic() + TRAFFIC_SECONDS, 0
    while time.monotonic() < deadline:
        prompt = PROMPTS[sent % len(PROMPTS)]
        kind = sent % 3
        if kind == 0:
            reply = cadre.post("/generate", json={"prompt": prompt, "max_new_tokens": 8})
        elif kind == 1:
            reply = cadre.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8})
        else:
            reply = cadre.post("/v1/chat/completions", json={"model": model, "max_tokens": 8,
                                                             "messages": [{"role": "user", "content": prompt}]})
        assert reply.status_code == 200, f"HTTP {reply.status_code}: {reply.text[:300]}"
        sent += 1
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: cadre.post("/generate", json={"prompt": PROMPTS[i % 5], "max_new_tokens": 24})
                              .status_code, range(8)))
    assert set(codes) <= {200, 503} and 503 in codes, f"burst codes {codes}"
    return f"{sent} requests in {TRAFFIC_SECONDS:.0f} s, then a burst: {codes.count(200)} x 200, {codes.count(503)} x 503"


def check_dashboard(dash, prom, cadre: httpx.Client) -> str:
    """Once Prometheus holds the final counts, every panel query of the dashboard."""
    generated = next(float(line.split()[1]) for line in cadre.get("/metrics").text.splitlines()
                     if line.startswith("cadre_generation_tokens_total "))

    def scraped_final() -> bool:
        result = prom.query("cadre_generation_tokens_total")
        return bool(result) and float(result[0]["value"][1]) == generated

    wait_until("Prometheus scraping the final counts", scraped_final, 30)
    evaluated, failures = dash.check_panels(prom, time.time(), RATE_INTERVAL, RANGE)
    assert not failures, "\n  ".join([f"{len(failures)} of {evaluated} queries:"] + failures)
    return f"{evaluated} queries of {len(dash.panels(dash.load()))} panels (repeats expanded), each non-empty and finite"


def stack(args) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from compose_helpers import CONTRACT_METRICS  # the contract's names, shared with the tests

    dash, checks = dashboard_module(), Checks()
    prom = dash.Prometheus(args.prometheus)
    with httpx.Client(base_url=args.cadre, timeout=60) as cadre:
        if checks.run("cadre /ready", lambda: check_ready(cadre, args.ready_timeout)) is None:
            return 1  # nothing else can pass
        checks.run("POST /generate with trace=true", lambda: check_generate_trace(cadre))
        checks.run("POST /v1/chat/completions", lambda: check_chat(cadre))
        checks.run("GET /metrics", lambda: check_metrics(cadre, CONTRACT_METRICS))
        checks.run("Prometheus scrapes cadre", lambda: check_scraped(prom))
        checks.run("traffic", lambda: traffic(cadre))
        checks.run("every Grafana dashboard query in Prometheus", lambda: check_dashboard(dash, prom, cadre))
    return 1 if checks.failed else 0


def check_store(cadre: httpx.Client, model: str, experts: int) -> str:
    served = [m["id"] for m in cadre.get("/v1/models").json()["data"]]
    assert served == [model], served
    layers = cadre.get("/v1/experts").json()["layers"]
    wanted = list(range(experts))
    wrong = [layer for layer in layers if sorted(layer["present"]) != wanted]
    assert layers and not wrong, f"layers not holding experts 0-{experts - 1}: {wrong[:2]}"
    body = {"prompt": PROMPTS[0], "max_new_tokens": TRACE_TOKENS, "temperature": 0, "trace": True}
    reply = cadre.post("/generate", json=body)
    assert reply.status_code == 200, f"HTTP {reply.status_code}: {reply.text[:300]}"
    routed = {e for step in reply.json()["trace"]["steps"] for layer in step["layers"] for e in layer["experts"]}
    assert routed and routed <= set(wanted), f"routed to experts outside the store: {sorted(routed - set(wanted))}"
    return f"{model!r}: {len(layers)} layers holding experts 0-{experts - 1}; a traced /generate routed only to {sorted(routed)}"


def store(args) -> int:
    checks = Checks()
    with httpx.Client(base_url=args.cadre, timeout=60) as cadre:
        if checks.run("cadre /ready on the extracted store", lambda: check_ready(cadre, args.ready_timeout)) is None:
            return 1
        checks.run("serving the extracted store", lambda: check_store(cadre, args.model, args.experts))
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("stack", "store"):
        command = sub.add_parser(name)
        command.add_argument("--cadre", required=True, help="cadre's base URL")
        command.add_argument("--ready-timeout", type=float, default=300.0)
    sub.choices["stack"].add_argument("--prometheus", required=True, help="Prometheus' base URL")
    sub.choices["store"].add_argument("--model", required=True, help="the store's name (its model id)")
    sub.choices["store"].add_argument("--experts", required=True, type=int, help="experts 0..N-1 per layer")
    args = parser.parse_args(argv)
    return stack(args) if args.command == "stack" else store(args)


if __name__ == "__main__":
    sys.exit(main())
