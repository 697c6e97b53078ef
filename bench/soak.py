"""Soak test: mixed traffic against `python -m server` on loopback for a bounded time, then
proof that nothing leaked and every valid request was answered correctly.

    python -m bench soak                          # 10 minutes, 12 clients, the demo model on CPU
    python -m bench soak --duration 60 --clients 8 --json bench/results/soak.json --log soak.log

Traffic, from every client in a loop: valid requests of every kind cadre serves (completion
prompts as strings, lists, token ids and token-id lists; echo + logprobs scoring as lm-eval
sends it; n > 1 and best_of; penalties, logit_bias, min_tokens, ignore_eos, stop strings and
stop token ids; generation logprobs; chat with logprobs; /generate with traces; streaming
with usage chunks), 5% malformed or hostile requests (bench/fuzz.py: the fixed cases and
mutations of valid bodies), and random client disconnects mid-stream and mid-request.

Every valid request is a template whose answer was recorded once, alone, before the
clients start; every later answer -- batched with whatever else runs, streamed or not --
must equal it (texts and token ids exactly, logprobs within 1e-3). Hostile requests must get
a 4xx in OpenAI's error shape (or a 200 when a mutation happens to be valid), never a 5xx.

Afterwards: cadre_requests_running, cadre_requests_waiting, KV pages held and expert pins
back to 0, /ready 200, the server's RSS flat (growth from the first sample after warm-up to
the end within --rss-bound-mib), no unhandled error in its log, and a clean SIGTERM exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.fuzz import Probe, hostile_cases, mutations
from bench.soak_answers import SERVED, Template, assemble_stream, differences, prompts, templates, view

REPO = Path(__file__).resolve().parents[1]
MAX_BODY = 1 << 16  # small, so oversize probes stay cheap
GAUGES = ("cadre_requests_running", "cadre_requests_waiting", "cadre_kv_cache_pages_used",
          "cadre_expert_cache_pinned")


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    wrong: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    transport: int = 0
    disconnects: int = 0
    latencies: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # the first few, for the report


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--clients", type=int, default=12, help="concurrent clients (8-16 in the issue)")
    p.add_argument("--hostile", type=float, default=0.05, help="fraction of malformed or hostile requests")
    p.add_argument("--disconnect", type=float, default=0.1, help="fraction of valid requests the client abandons")
    p.add_argument("--max-concurrency", type=int, default=8, help="server --max-concurrency")
    p.add_argument("--engine", default="auto", help="server --engine (auto: continuous batching on CPU, the "
                                                    "decoder on CUDA)")
    p.add_argument("--device", default="cpu", help="server --device")
    p.add_argument("--dtype", default="auto", help="server --dtype (on CUDA float32 keeps batched answers equal to "
                                                  "the ones recorded alone; bf16 rounds differently per batch size)")
    p.add_argument("--rss-bound-mib", type=float, default=64.0,
                   help="allowed RSS growth from the first sample after warm-up to the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--log", type=Path, help="also write the printed report here")
    return p.parse_args(argv)


# --- one request -------------------------------------------------------------------------------------

async def send_valid(client: httpx.AsyncClient, url: str, t: Template, rng: random.Random, tally: Tally,
                     disconnect: float) -> None:
    stream = t.streams and rng.random() < 0.5
    abandon = rng.random() < disconnect
    body = dict(t.body)
    if stream:
        body["stream"] = True
        if t.path != "/generate":
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": rng.random() < 0.5}
    tally.sent += 1
    started = time.perf_counter()
    try:
        if stream:
            answer = await read_stream(client, url + t.path, body, t.path, rng.randrange(1, 6) if abandon else None)
            if answer is None:
                tally.disconnects += 1
                return
        else:
            timeout = rng.uniform(0.02, 0.4) if abandon else 600
            try:
                response = await client.post(url + t.path, json=body, timeout=timeout)
            except httpx.TimeoutException:
                if abandon:
                    tally.disconnects += 1
                    return
                raise
            if response.status_code != 200:
                record_status(tally, response.status_code, f"{t.name}: {response.status_code} {response.text[:160]}")
                return
            answer = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        tally.transport += 1
        tally.problems.append(f"{t.name}: {type(exc).__name__}: {exc}"[:200])
        return
    tally.latencies.append(time.perf_counter() - started)
    problem = differences(view(t.path, answer), view(t.path, t.reference))
    if problem is None:
        tally.ok += 1
    else:
        tally.wrong += 1
        tally.problems.append(f"{t.name} ({'stream' if stream else 'plain'}): {problem}")


def record_status(tally: Tally, status: int, problem: str) -> None:
    if status >= 500:
        tally.status_5xx += 1
    else:
        tally.status_4xx += 1
    tally.problems.append(problem)


async def read_stream(client, url: str, body: dict, path: str, abandon_after: int | None) -> dict | None:
    """The stream's answer, rebuilt; None when abandoned on purpose after `abandon_after` events."""
    events = []
    async with client.stream("POST", url, json=body, timeout=600) as response:
        if response.status_code != 200:
            await response.aread()
            raise ValueError(f"status {response.status_code}: {response.text[:160]}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if abandon_after is not None and len(events) >= abandon_after:
                    return None  # leaving the block closes the connection mid-stream
    return assemble_stream(path, events)


async def send_hostile(client: httpx.AsyncClient, url: str, probe: Probe, tally: Tally) -> None:
    tally.sent += 1
    headers = {"Content-Type": probe.content_type} if probe.body is not None else {}
    try:
        response = await client.request(probe.method, url + probe.path, content=probe.body, headers=headers,
                                        timeout=600)
    except httpx.HTTPError as exc:
        tally.transport += 1
        tally.problems.append(f"{probe.name}: {type(exc).__name__}")
        return
    if response.status_code >= 500:
        record_status(tally, response.status_code, f"{probe.name}: {response.status_code} {response.text[:160]}")
    elif response.status_code >= 400:
        tally.status_4xx += 1
        error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith(
            "application/json") else {}
        if set(error) != {"message", "type", "param", "code"}:
            tally.wrong += 1
            tally.problems.append(f"{probe.name}: {response.status_code} not in OpenAI's error shape")
        else:
            tally.ok += 1
    else:
        tally.ok += 1  # a mutation that happened to be valid


# --- the run -----------------------------------------------------------------------------------------

def start_server(port: int, args, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "server", "--port", str(port), "--device", args.device, "--dtype", args.dtype,
               "--max-concurrency", str(args.max_concurrency), "--max-queue", "512",
               "--max-body-bytes", str(MAX_BODY), "--engine", args.engine, "--log-level", "info"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families((await client.get(f"{url}/metrics", timeout=30)).text):
        for sample in family.samples:
            if sample.name in GAUGES:
                values[sample.name] = sample.value
    return values


async def watch(client, url: str, pid: int, samples: list, stop: asyncio.Event, every: float) -> None:
    import psutil

    process = psutil.Process(pid)
    started = time.perf_counter()
    while not stop.is_set():
        ready = (await client.get(f"{url}/ready", timeout=30)).status_code
        samples.append({"t": round(time.perf_counter() - started, 1), "rss_mib": process.memory_info().rss / 2**20,
                        "ready": ready, "load": os.getloadavg()[0], **await scrape(client, url)})
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def traffic(url: str, args, items: list[Template], probes: list[Probe], valid_bodies, pid: int):
    tallies: dict[str, Tally] = defaultdict(Tally)
    samples: list[dict] = []
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(watch(client, url, pid, samples, stop, every=max(2.0, args.duration / 60)))

        async def one_client(i: int):
            rng = random.Random(args.seed * 1000 + i)
            fuzzed = mutations(random.Random(args.seed * 1000 + i + 500), valid_bodies)
            while time.perf_counter() < deadline:
                if rng.random() < args.hostile:
                    probe = rng.choice(probes) if rng.random() < 0.5 else next(fuzzed)
                    await send_hostile(client, url, probe, tallies["hostile or malformed"])
                else:
                    t = rng.choice(items)
                    await send_valid(client, url, t, rng, tallies[t.name], args.disconnect)

        await asyncio.gather(*(one_client(i) for i in range(args.clients)))
        idle = await wait_idle(client, url)
        stop.set()
        await watcher
        samples.append({"t": "end", "rss_mib": __import__("psutil").Process(pid).memory_info().rss / 2**20,
                        "ready": (await client.get(f"{url}/ready")).status_code, **idle})
    return tallies, samples


async def wait_idle(client, url: str, timeout: float = 60) -> dict:
    """The gauges once every request is done (cancelled pages free at the loop's next step)."""
    deadline = time.perf_counter() + timeout
    while True:
        values = await scrape(client, url)
        if all(values.get(name, 0) == 0 for name in GAUGES) or time.perf_counter() > deadline:
            return values
        await asyncio.sleep(0.5)


def record_references(url: str, items: list[Template]) -> None:
    with httpx.Client(timeout=600) as client:
        for t in items:
            response = client.post(url + t.path, json=t.body)
            response.raise_for_status()
            t.reference = response.json()


def tokenize(url: str, texts: list[str]) -> list[list[int]]:
    with httpx.Client(timeout=60) as client:
        return [client.post(f"{url}/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def report(tallies: dict[str, Tally], samples: list[dict], args, checks: dict) -> tuple[str, list[dict]]:
    rows, lines = [], []
    lines.append("| kind | sent | ok | wrong | 4xx | 5xx | transport errors | disconnects (on purpose) | p50 s | p99 s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, t in sorted(tallies.items()):
        row = {"kind": name, "sent": t.sent, "ok": t.ok, "wrong": t.wrong, "status_4xx": t.status_4xx,
               "status_5xx": t.status_5xx, "transport_errors": t.transport, "disconnects": t.disconnects,
               "latency_p50": percentile(t.latencies, 50), "latency_p99": percentile(t.latencies, 99),
               "problems": t.problems[:5]}
        rows.append(row)
        p50, p99 = row["latency_p50"], row["latency_p99"]
        lines.append(f"| {name} | {t.sent} | {t.ok} | {t.wrong} | {t.status_4xx} | {t.status_5xx} | {t.transport} | "
                     f"{t.disconnects} | {p50 if p50 is None else f'{p50:.2f}'} | "
                     f"{p99 if p99 is None else f'{p99:.2f}'} |")
    for row in rows:
        for problem in row["problems"]:
            lines.append(f"  problem: {problem}")
    lines.append("")
    lines.append("samples (t s: RSS MiB, running, waiting, KV pages, pins, /ready, load): " + "; ".join(
        f"{s['t']}: {s['rss_mib']:.0f}, {s.get('cadre_requests_running', '?'):.0f}, "
        f"{s.get('cadre_requests_waiting', 0):.0f}, {s.get('cadre_kv_cache_pages_used', 0):.0f}, "
        f"{s.get('cadre_expert_cache_pinned', 0):.0f}, {s['ready']}, {s.get('load', os.getloadavg()[0]):.1f}"
        for s in samples))
    lines.append("")
    for name, (passed, detail) in checks.items():
        lines.append(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
    return "\n".join(lines), rows


def leak_checks(tallies: dict[str, Tally], samples: list[dict], args, server_log: str, exit_code) -> dict:
    end = samples[-1]
    warm = next((s for s in samples if s["t"] != "end" and s["t"] >= min(60.0, args.duration / 4)), samples[0])
    growth = end["rss_mib"] - warm["rss_mib"]
    valid = {k: t for k, t in tallies.items() if k != "hostile or malformed"}
    hostile = tallies.get("hostile or malformed", Tally())
    unhandled = server_log.count('"event": "unhandled_error"')
    return {
        "every valid request answered correctly": (
            all(t.wrong == 0 and t.status_4xx == 0 and t.transport == 0 for t in valid.values()),
            f"{sum(t.ok for t in valid.values())} correct of {sum(t.sent - t.disconnects for t in valid.values())} "
            f"completed, {sum(t.wrong for t in valid.values())} wrong"),
        "zero 5xx": (sum(t.status_5xx for t in tallies.values()) == 0,
                     f"{sum(t.status_5xx for t in tallies.values())} 5xx over {sum(t.sent for t in tallies.values())} "
                     "requests"),
        "hostile requests refused cleanly": (hostile.wrong == 0 and hostile.transport == 0,
                                             f"{hostile.status_4xx} 4xx, {hostile.ok - hostile.status_4xx} 200 "
                                             f"(valid mutations) of {hostile.sent}"),
        "nothing held when idle": (all(end.get(name, 0) == 0 for name in GAUGES),
                                   ", ".join(f"{name} {end.get(name, 0):.0f}" for name in GAUGES)),
        "ready throughout": (all(s["ready"] == 200 for s in samples),
                             f"{sum(s['ready'] == 200 for s in samples)} of {len(samples)} samples 200"),
        "RSS flat": (growth <= args.rss_bound_mib,
                     f"{warm['rss_mib']:.0f} MiB at {warm['t']} s -> {end['rss_mib']:.0f} MiB at the end "
                     f"({growth:+.1f} MiB, bound {args.rss_bound_mib:g} MiB)"),
        "no unhandled error logged": (unhandled == 0 and "Traceback" not in server_log,
                                      f"{unhandled} unhandled_error events"),
        "clean SIGTERM exit": (exit_code in (0, -signal.SIGTERM), f"exit code {exit_code}"),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from bench.results_file import header
    from bench.serve import free_port, wait_ready

    workdir = REPO / ".cache" / "soak"
    workdir.mkdir(parents=True, exist_ok=True)
    server_log = workdir / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, args, server_log)
    exit_code = None
    load_before = os.getloadavg()[0]
    try:
        wait_ready(url, server)
        texts = prompts()
        items = templates(tokenize(url, texts), texts)
        record_references(url, items)
        probes = hostile_cases(SERVED, MAX_BODY)
        valid_bodies = [(t.path, t.body) for t in items]
        tallies, samples = asyncio.run(traffic(url, args, items, probes, valid_bodies, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    checks = leak_checks(tallies, samples, args, server_log.read_text(), exit_code)
    description = (f"python -m bench soak: demo model on {args.device} (dtype {args.dtype}), engine {args.engine}, "
                   f"{args.duration:g} s, "
                   f"{args.clients} clients, "
                   f"server --max-concurrency {args.max_concurrency}, {args.hostile:.0%} hostile, "
                   f"{args.disconnect:.0%} of valid requests abandoned; {os.cpu_count()} CPUs, 1-min load average "
                   f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    text, rows = report(tallies, samples, args, checks)
    output = description + "\n\n" + text
    print(output)
    if args.log:
        args.log.write_text(output + "\n")
    if args.json:
        args.json.write_text(json.dumps({**header(["python", "-m", "bench", "soak", *argv]),
                                         "description": description, "rows": rows, "samples": samples,
                                         "checks": {k: {"pass": v[0], "detail": v[1]} for k, v in checks.items()}},
                                        indent=2))
    return 0 if all(passed for passed, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
