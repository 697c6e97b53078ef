"""Expert-affinity routing on Ray Serve against Ray's own policies, in one run:

    python -m bench affinity                      # demo model, 2 CPU replicas, 25% expert budget
    python -m bench affinity --store STORE --device cuda --gpus-per-replica 1 --clients 16

A local Ray cluster serves `python -m server.ray`'s application with 2 replicas (each a
cadre engine holding --cache-fraction of the experts) and each request router in turn:
affinity (server/ray/request_router.py), power-of-two (Ray Serve's default) and round-robin.
Every (round, router) is a fresh deployment (cold caches), rounds rotate the order (a busy
machine drifts). The workload has distinct routing profiles: prompts from two held-out
plays (Macbeth, Twelfth Night) and two non-Shakespeare sources (English prose: Python's
standard-library docstrings; Python source code); each client sticks to one source. The
affinity router's token profile is built first from *other* text of the same sources.

Per row: hit rate of the expert caches (server counters, summed over replicas), expert
loads per generated token, aggregate tok/s, p50/p99 end-to-end latency; then medians per
router, and affinity's hit rate and p99 against power-of-two's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import _provenance
from .serve import free_port, one_request, summarize

ROUTERS = ("affinity", "power-of-two", "round-robin")
PROFILE_TOKENS = 65_536  # of calibration text routed for the token profile
CALIBRATION_CHARS = 60_000  # of each source: every source in the profile, none crowding out the rest
PROSE_MODULES = ("os", "json", "argparse", "collections", "asyncio", "pathlib", "subprocess", "logging")
PROSE_CALIBRATION = ("functools", "itertools", "email.message", "http.client", "unittest", "typing", "inspect")
CODE_MODULES = ("argparse", "csv", "dataclasses")
CODE_CALIBRATION = ("json.decoder", "shlex", "textwrap", "fractions")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with bench/ray_scaling.py."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-fraction", type=float, default=0.25)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, spread evenly over the sources")
    p.add_argument("--requests", type=int, default=96, help="requests per row")
    p.add_argument("--warmup", type=int, default=24, help="requests per row before measuring (caches settle)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--prompt-chars", type=int, default=160, help="prompt length in characters")
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--affinity-imbalance", type=int, default=0)
    p.add_argument("--profile-layers", type=int, default=4)
    p.add_argument("--profile-device", default="cpu", help="device the token profile is built on")
    p.add_argument("--json", type=Path)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench affinity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="expert store (default: the demo model)")
    p.add_argument("--rounds", type=int, default=2)
    add_common_args(p)
    return p.parse_args(argv)


# --- workload ----------------------------------------------------------------------------------
def plays() -> tuple[str, str]:
    from models.demo import HELDOUT_TEST_TEXT

    text = HELDOUT_TEST_TEXT.read_text()
    split = text.index("TWELFTH NIGHT; OR")
    return text[:split], text[split:]


def docstrings(modules) -> str:
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if not attr.startswith("_") else None
            if doc and len(doc) > 200:
                docs.append(doc)
    return "\n\n".join(docs)


def source_code(modules) -> str:
    return "\n".join(inspect.getsource(importlib.import_module(name)) for name in modules)


def prompts_from(text: str, chars: int, count: int) -> list[str]:
    """`count` prompts of about `chars` characters, spread over `text`, cut at line starts."""
    lines = [line for line in text.splitlines() if line.strip()]
    step = max(1, len(lines) // count)
    prompts = []
    for start in range(0, len(lines), step):
        prompt = ""
        for line in lines[start:]:
            prompt += line.strip() + "\n"
            if len(prompt) >= chars:
                break
        prompts.append(prompt[:chars * 2])
    return prompts[:count]


def workload(chars: int, count: int = 24) -> tuple[dict[str, list[str]], str]:
    """(prompts by source, calibration text from other parts of the same sources)."""
    macbeth, twelfth = plays()
    half_m, half_t = len(macbeth) // 2, len(twelfth) // 2
    prompts = {"macbeth": prompts_from(macbeth[half_m:], chars, count),
               "twelfth-night": prompts_from(twelfth[half_t:], chars, count),
               "prose": prompts_from(docstrings(PROSE_MODULES), chars, count),
               "code": prompts_from(source_code(CODE_MODULES), chars, count)}
    calibration = "\n".join(text[:CALIBRATION_CHARS] for text in (macbeth[:half_m], twelfth[:half_t],
                                                                  docstrings(PROSE_CALIBRATION),
                                                                  source_code(CODE_CALIBRATION)))
    return prompts, calibration


# --- one row -----------------------------------------------------------------------------------
def counters(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=60).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name if s.name != "cadre_router_decisions_total" else f"decision:{s.labels['outcome']}"
            totals[key] = totals.get(key, 0.0) + s.value
    return totals


async def drive(url: str, prompts: dict[str, list[str]], clients: int, requests: int, max_tokens: int) -> tuple:
    sources = list(prompts)
    remaining = iter(range(requests))
    results: list[dict] = []
    started = time.perf_counter()

    async def client_loop(client, index: int):
        own = prompts[sources[index % len(sources)]]  # each client sticks to one source
        for i in remaining:
            await one_request(client, url, own[(i // clients + index) % len(own)], max_tokens, results)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients + 1)) \
            as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    return results, started


def measure(url: str, prompts, args) -> dict:
    asyncio.run(drive(url, prompts, args.clients, args.warmup, args.max_tokens))
    before = counters(url)
    results, started = asyncio.run(drive(url, prompts, args.clients, args.requests, args.max_tokens))
    after = counters(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    queries = delta.get("cadre_expert_cache_queries_total", 0.0)
    loads = sum(v for k, v in delta.items() if k == "cadre_expert_loads_total")
    tokens = delta.get("cadre_generation_tokens_total", 0.0)
    row = summarize(args.clients, results, started)
    row.update(hit_rate=delta.get("cadre_expert_cache_hits_total", 0.0) / queries if queries else None,
               loads_per_token=loads / tokens if tokens else None,
               decisions={k.split(":", 1)[1]: v for k, v in delta.items()  # pinned: the bench's own scrapes
                          if k.startswith("decision:") and v and k != "decision:pinned"})
    return row


def deploy(args, router: str, profile: str | None, port: int) -> None:
    from ray import serve

    from server.ray.app import build_app
    from server.ray.cli import parse_ray_config

    argv = ["--device", args.device, "--cache-fraction", str(args.cache_fraction), "--replicas", str(args.replicas),
            "--request-router", router, "--cpus-per-replica", str(args.cpus_per_replica),
            "--gpus-per-replica", str(args.gpus_per_replica), "--max-concurrency", str(args.max_concurrency),
            "--max-queue", "1024", "--affinity-imbalance", str(args.affinity_imbalance), "--log-level", "warning",
            "--routing-stats-period-s", "0.5", "--port", str(port)]
    argv += ["--store", args.store] if args.store else []
    argv += ["--affinity-profile", profile] if profile and router == "affinity" else []
    serve.run(build_app(parse_ray_config(argv)), name="cadre", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:  # every replica loaded and scraped
        try:
            text = httpx.get(f"{url}/metrics", timeout=60).text
            ids = {s.labels.get("replica") for f in text_string_to_metric_families(text)
                   if f.name == "cadre_requests_running" for s in f.samples}
            if len(ids) == args.replicas:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "replicas did not come up"
        time.sleep(1.0)


# --- report ------------------------------------------------------------------------------------
def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_results(rows: list[dict], description: str) -> None:
    print(f"\n{description}")
    print(f"{'round':>5} {'router':>12} {'requests':>8} {'errors':>6} {'hit rate':>8} {'loads/tok':>9} {'tok/s':>7} "
          f"{'p50 lat s':>9} {'p99 lat s':>9}  decisions")
    for r in rows:
        print(f"{r['round']:>5} {r['router']:>12} {r['requests']:>8} {r['errors']:>6} {fmt(r['hit_rate'], '.1%'):>8} "
              f"{fmt(r['loads_per_token'], '.2f'):>9} {r['tok_s']:>7.1f} {fmt(r['latency_p50'], '.2f'):>9} "
              f"{fmt(r['latency_p99'], '.2f'):>9}  {json.dumps(r['decisions']) if r['decisions'] else ''}")
    summary = {}
    for router in dict.fromkeys(r["router"] for r in rows):
        mine = [r for r in rows if r["router"] == router and r["requests"]]
        summary[router] = {k: median(r[k] for r in mine) for k in ("hit_rate", "loads_per_token", "tok_s",
                                                                    "latency_p99")}
        m = summary[router]
        print(f"median {router:>12}: hit rate {m['hit_rate']:.1%}, loads/token {m['loads_per_token']:.2f}, "
              f"{m['tok_s']:.1f} tok/s, p99 {m['latency_p99']:.2f} s")
    if "affinity" in summary and "power-of-two" in summary:
        a, p = summary["affinity"], summary["power-of-two"]
        print(f"affinity / power-of-two: hit rate {a['hit_rate'] / p['hit_rate']:.2f}x, "
              f"p99 latency {a['latency_p99'] / p['latency_p99']:.2f}x, tok/s {a['tok_s'] / p['tok_s']:.2f}x")
    return summary


def build_profile_for(args, calibration: str, workdir: Path) -> str:
    from models.demo import ensure_demo_store
    from router.token_profile import build_profile

    store = args.store or str(ensure_demo_store())
    path = workdir / "bench-affinity-profile.safetensors"
    build_profile(store, calibration, layers=args.profile_layers, max_tokens=PROFILE_TOKENS,
                  device=args.profile_device).save(path)
    from .decode import free_memory

    free_memory()  # the profile held every expert on its device: give it back before the replicas start
    return str(path)


def result_record(name: str, argv, rows: list[dict], summary: dict, description: str) -> dict:
    """The run's record, with the provenance every bench result has (the commit from
    $CADRE_COMMIT on the GPU machine, whose copy of the tree has no history of its own)."""
    return {**_provenance.header(name, argv), "description": description, "summary": summary, "rows": rows}


def chosen_routers(args) -> list[str] | None:
    routers = args.routers.split(",")
    if not set(routers) <= set(ROUTERS):
        print(f"error: --routers {args.routers}: each must be one of {', '.join(ROUTERS)}", file=sys.stderr)
        return None
    return routers


def main(argv) -> int:
    args = parse_args(argv)
    routers = chosen_routers(args)
    if routers is None:
        return 2
    from server.ray.cluster import start_local_cluster

    prompts, calibration = workload(args.prompt_chars)
    workdir = Path(os.environ.get("CADRE_CACHE_DIR") or Path.home() / ".cache" / "cadre")
    workdir.mkdir(parents=True, exist_ok=True)
    profile = build_profile_for(args, calibration, workdir) if "affinity" in routers else None
    port = free_port()
    cpus = int(args.replicas * args.cpus_per_replica + 1.999)
    gpus = int(args.replicas * args.gpus_per_replica + 0.999) or None
    start_local_cluster(cpus, num_gpus=gpus)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    load_before, rows = os.getloadavg()[0], []
    try:
        for round_ in range(args.rounds):
            for router in routers[round_ % len(routers):] + routers[:round_ % len(routers)]:
                deploy(args, router, profile, port)
                row = {"round": round_ + 1, "router": router, **measure(f"http://127.0.0.1:{port}", prompts, args)}
                rows.append(row)
                print(f"  round {round_ + 1}, {router}: hit rate {fmt(row['hit_rate'], '.1%')}, "
                      f"{row['tok_s']:.1f} tok/s, p99 {fmt(row['latency_p99'], '.2f')} s", file=sys.stderr)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    model = args.store or "demo model"
    description = (f"python -m bench affinity: {model} on {args.device}, {args.replicas} replicas x "
                   f"{args.cpus_per_replica:g} CPU / {args.gpus_per_replica:g} GPU, cache {args.cache_fraction:.0%} of "
                   f"experts (layer-lru), {args.clients} streaming clients over {len(prompts)} sources "
                   f"({', '.join(prompts)}; each client sticks to one), {args.requests} requests per row after "
                   f"{args.warmup} warm-up, {args.max_tokens} new tokens, greedy; {os.cpu_count()} CPUs, 1-min load "
                   f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    summary = print_results(rows, description)
    if args.json:
        args.json.write_text(json.dumps(result_record("affinity", argv, rows, summary, description), indent=2))
    return 0 if all(r["errors_5xx"] == 0 for r in rows) else 1
