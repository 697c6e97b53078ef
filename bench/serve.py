"""Serving benchmark: `python -m server` under 1, 4 and 16 concurrent streaming clients on
loopback, then transformers on the same model and prompts in the same run.

    python -m bench serve                         # the demo model on CPU
    python -m bench serve --clients 1,4,16 --requests 48 --duration 90 --max-tokens 32

Each level is bounded in count (--requests) and time (--duration: no request starts after it;
--level-timeout: the ones still streaming then are cut, their tokens counted). Per level it prints
requests/s, aggregate generated tokens/s, p50/p99 end-to-end latency and time to first
token (first SSE token event), and errors (5xx apart). The reference rows are
transformers' generate() one prompt at a time and generate_batch() (its continuous
batching, offline: no HTTP, no cadre) on all the prompts of a 16-client level at once, at
the dtype the server computes in. They are timed in every round, right after that round's
server levels, each round in a fresh process with the server's torch thread count, so
both sides see the same machine and neither inherits the other's threads; medians over
the rounds are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import httpx

from bench import _provenance
from bench.report import tokens_of

REPO = Path(__file__).resolve().parents[1]
GENERIC_PROMPTS = ["The history of", "Once upon a time", "In the beginning", "To be, or not to be",
                   "The cache holds", "A model of experts", "When the sun rose", "It was the best of times"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--store", help="expert store to serve (no transformers reference without a checkpoint)")
    source.add_argument("--model", help="checkpoint to serve (default: the built-in demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="server --dtype (auto: float32 on CPU)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=48, help="requests per level at most")
    p.add_argument("--requests-per-client", type=int, default=None, metavar="N",
                   help="a level's requests are N x its clients (replaces --requests): every client stays busy "
                        "for N requests, where a fixed count leaves a 16-client level's last wave half empty")
    p.add_argument("--duration", type=float, default=90.0, help="seconds per level at most (requests in flight finish)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_new_tokens of every request")
    p.add_argument("--profile", type=int, metavar="CLIENTS",
                   help="sample the server's threads (server --enable-profiling, POST /debug/profile) during the "
                        "first round's level of CLIENTS clients: collapsed stacks to --profile-out, a summary printed")
    p.add_argument("--profile-seconds", type=float, default=8.0, help="how long --profile samples")
    p.add_argument("--profile-out", type=Path, help="collapsed stacks file (default: beside --json, .stacks.txt)")
    p.add_argument("--level-timeout", type=float, default=None,
                   help="seconds a level may take at most: requests still streaming then are cut (closed; "
                        "their tokens count toward tok/s, not their latency). Default: they finish")
    p.add_argument("--cache-fraction", type=float, default=None, help="server --cache-fraction")
    p.add_argument("--gpu-memory", help="server --gpu-memory (the memory plan sizes the expert slots)")
    p.add_argument("--host-memory", help="server --host-memory (the pinned host tier's cap)")
    p.add_argument("--compile-step", action="store_true", help="server --compile-step")
    p.add_argument("--eviction", default="layer-lru", help="server --eviction (default: the server's, layer-lru)")
    p.add_argument("--engine", default="auto", help="server --engine (auto: the decoder on CUDA)")
    p.add_argument("--max-model-len", type=int, default=1024, help="server --max-model-len")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every level this many times, interleaved (a busy machine varies from minute to minute)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers rows")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)  # one round's reference, as JSON
    return p.parse_args(argv)


def prompts_for(args) -> list[str]:
    """Distinct prompts: lines of the demo's held-out text (never trained on), else generic ones."""
    if args.store or args.model:
        return GENERIC_PROMPTS * 8
    from models.demo import HELDOUT_TEST_TEXT

    lines = [line.strip() for line in HELDOUT_TEST_TEXT.read_text().splitlines() if len(line.strip()) > 24]
    step = max(1, len(lines) // 64)
    return lines[::step][:64]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, max_concurrency: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "server", "--port", str(port), "--device", args.device, "--dtype", args.dtype,
               "--max-concurrency", str(max_concurrency), "--max-queue", "1024", "--log-level", "warning"]
    if args.store:
        command += ["--store", args.store]
    if args.model:
        command += ["--model", args.model]
    if args.cache_fraction:
        command += ["--cache-fraction", str(args.cache_fraction)]
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--host-memory", args.host_memory)):
        if value:
            command += [flag, value]
    if args.compile_step:
        command.append("--compile-step")
    if args.profile:
        command.append("--enable-profiling")
    command += ["--eviction", args.eviction, "--engine", args.engine, "--max-model-len", str(args.max_model_len)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, results: list[dict]) -> None:
    """Stream one /generate request; its result goes into `results`, also when the level's
    time is up and the request is cancelled mid-stream ("cut", with the tokens it had)."""
    started = time.perf_counter()
    arrivals = []  # each token's arrival: the first is the TTFT, their count what a cut request streamed
    try:
        async with client.stream("POST", f"{url}/generate", json={"prompt": prompt, "max_new_tokens": max_tokens,
                                                                   "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                results.append({"status": response.status_code})
                return
            final = None
            async for line in response.aiter_lines():
                if line.startswith("event: token"):
                    arrivals.append(time.perf_counter())
                elif line.startswith("data: ") and '"finish_reason"' in line:
                    final = json.loads(line[len("data: "):])
            if final is None:
                results.append({"status": "no final event"})
                return
    except httpx.HTTPError as exc:
        results.append({"status": type(exc).__name__})
        return
    except asyncio.CancelledError:  # the level's time is up: closing the stream cancels it on the server
        results.append({"status": "cut", "tokens": len(arrivals), "end": time.perf_counter(), "arrivals": arrivals})
        raise
    end = time.perf_counter()
    results.append({"status": 200, "latency": end - started, "ttft": (arrivals[0] if arrivals else end) - started,
                    "tokens": final["usage"]["completion_tokens"], "end": end, "arrivals": arrivals})


def level_requests(args, clients: int) -> int:
    """How many requests a level of `clients` sends (at most: --duration may end it first)."""
    return args.requests if args.requests_per_client is None else args.requests_per_client * clients


async def run_level(url: str, clients: int, prompts: list[str], args, profile: bool = False) -> dict:
    """One concurrency level; with `profile`, the server's threads sampled while it runs (the
    row's "stacks": collapsed stacks, text)."""
    remaining = iter(range(level_requests(args, clients)))
    results: list[dict] = []
    started = time.perf_counter()
    deadline = started + args.duration

    async def client_loop(client):
        for i in remaining:
            if time.perf_counter() > deadline:
                return
            await one_request(client, url, prompts[i % len(prompts)], args.max_tokens, results)

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        before = (await client.get(f"{url}/v1/experts")).json()["cache"]
        loops = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        sampling = asyncio.create_task(sample_server(client, url, args)) if profile else None
        # --level-timeout: the requests still streaming then are cut, so a slow level still ends
        _, unfinished = await asyncio.wait(loops, timeout=args.level_timeout)
        for loop in unfinished:
            loop.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        stacks = await sampling if sampling is not None else None
        after = (await client.get(f"{url}/v1/experts")).json()["cache"]
    row = {**summarize(clients, results, started), **cache_delta(before, after)}
    return row if stacks is None else {**row, "stacks": stacks}


async def sample_server(client: httpx.AsyncClient, url: str, args) -> str:
    """The server's threads, sampled once the level has settled (a second in, or a quarter of it)."""
    await asyncio.sleep(min(1.0, args.duration / 4))
    response = await client.post(f"{url}/debug/profile", params={"seconds": args.profile_seconds},
                                 timeout=args.profile_seconds + 60)
    response.raise_for_status()
    return response.text


def profile_summary(stacks: str, top: int = 12) -> list[str]:
    """Per server thread: its samples, and the cadre functions (models/, server/, router/) most
    often on its stack, with the share of the thread's samples each was on."""
    threads, inclusive = {}, {}
    for line in stacks.splitlines():
        stack, count = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        threads[thread] = threads.get(thread, 0) + int(count)
        for frame in dict.fromkeys(f.rsplit(":", 1)[0] for f in frames if f.startswith(("models/", "server/", "router/"))):
            inclusive[(thread, frame)] = inclusive.get((thread, frame), 0) + int(count)
    lines = []
    for thread, samples in sorted(threads.items(), key=lambda kv: -kv[1]):
        mine = sorted(((n, f) for (t, f), n in inclusive.items() if t == thread), reverse=True)[:top]
        if not mine:
            continue
        lines.append(f"  {thread}: {samples} samples")
        lines += [f"    {n / samples:6.1%}  {frame}" for n, frame in mine]
    return lines


def save_profile(stacks: str, clients: int, args) -> None:
    out = args.profile_out or (args.json.with_suffix(".stacks.txt") if args.json else None)
    if out is not None:
        Path(out).write_text(stacks)
    print(f"server threads sampled for {args.profile_seconds:g} s at {clients} clients"
          + (f" (collapsed stacks: {out})" if out else "") + ":", file=sys.stderr)
    print("\n".join(profile_summary(stacks)), file=sys.stderr)


def cache_delta(before: dict, after: dict) -> dict:
    """The expert cache's hit rate and loads during one level (server-side counters)."""
    queries = after["queries"] - before["queries"]
    loads = sum(after["loads"].values()) - sum(before["loads"].values())
    return {"hit_rate": (after["hits"] - before["hits"]) / queries if queries else None, "loads": loads}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def streaming_rate(clients: int, ended: list[dict]) -> float | None:
    """Aggregate tok/s once `clients` requests are streaming: the tokens that arrived after the
    `clients`-th first token, over the time from it to the last token. A level's tok/s counts its
    start, when every client's prompt is being prefilled; at full depth each prefill streams most of
    the model, and a short level then measures prefills, not decoding (serve-full, 2026-12-01).
    Later requests' prefills still count here: they are part of serving. None when fewer than
    `clients` requests streamed a token."""
    firsts = sorted(r["arrivals"][0] for r in ended if r.get("arrivals"))
    if len(firsts) < clients:
        return None
    since = firsts[clients - 1]
    last = max(r["arrivals"][-1] for r in ended if r.get("arrivals"))
    tokens = sum(1 for r in ended for t in r.get("arrivals", ()) if t > since)
    return tokens / (last - since) if last > since else None


def summarize(clients: int, results: list[dict], started: float) -> dict:
    """A level's row: completed requests' latencies; tok/s over every token streamed, the cut
    requests' (--level-timeout) included, until the last stream ended; and the same once every
    client streams (streaming_rate)."""
    ok = [r for r in results if r["status"] == 200]
    cut = [r for r in results if r["status"] == "cut"]
    ended = ok + cut
    wall = (max(r["end"] for r in ended) - started) if ended else float("nan")
    latencies, ttfts = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {
        "clients": clients, "requests": len(ok), "cut": len(cut), "wall_s": wall,
        "errors": len(results) - len(ended),
        "errors_5xx": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
        "req_s": len(ok) / wall if ok else 0.0,
        "tokens": sum(r["tokens"] for r in ended),
        "tok_s": sum(r["tokens"] for r in ended) / wall if ended else 0.0,
        "streaming_tok_s": streaming_rate(clients, ended),
        "tokens_per_request": sum(r["tokens"] for r in ok) / len(ok) if ok else 0.0,
        "latency_p50": percentile(latencies, 50) if ok else None, "latency_p99": percentile(latencies, 99) if ok else None,
        "ttft_p50": percentile(ttfts, 50) if ok else None, "ttft_p99": percentile(ttfts, 99) if ok else None,
    }


def sequential_generate(model, encoded: list[list[int]], args) -> dict:
    """generate() one prompt after another (bounded by --duration), after a warm-up."""
    import torch

    model.generate(torch.tensor([encoded[0]], device=args.device), max_new_tokens=2, do_sample=False)
    started, tokens, count = time.perf_counter(), 0, 0
    for ids in encoded:
        out = model.generate(torch.tensor([ids], device=args.device), max_new_tokens=args.max_tokens, do_sample=False)
        tokens += out.shape[1] - len(ids)
        count += 1
        if time.perf_counter() - started > args.duration:
            break
    wall = time.perf_counter() - started
    return {"tok_s": tokens / wall, "req_s": count / wall, "count": count}


def reference_rows(args, prompts: list[str], batch: int) -> list[dict]:
    """transformers on the same checkpoint and prompts, at the server's dtype: generate() one by
    one and generate_batch() on all at once; generate() also at the checkpoint's own dtype when
    the server computes in another (why CPU serving defaults to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

    from server.app import resolved_dtype
    from server.config import ServerConfig

    if args.model:
        checkpoint = Path(args.model)
    else:
        from models.demo import CHECKPOINT_DIR as checkpoint
    served = resolved_dtype(ServerConfig(device=args.device, dtype=args.dtype))
    torch.set_num_threads(os.cpu_count())  # the server's compute thread uses every core too
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    level = [tokenizer(prompts[i % len(prompts)])["input_ids"] for i in range(args.requests)]  # a level's requests
    encoded = level[:batch]
    rows = []

    def load(dtype):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype) if dtype else "auto")
        return model.to(args.device).eval()

    model = load(served)
    name = str(model.dtype).removeprefix("torch.")
    r = sequential_generate(model, encoded, args)
    rows.append({"system": f"transformers generate() {name}, one prompt at a time", **r})
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False,
                              eos_token_id=model.generation_config.eos_token_id)
    # The server's batching geometry; the manager persists so the timed call pays no set-up.
    cb = ContinuousBatchingConfig(max_requests_per_batch=batch, page_size=64, num_blocks=(batch + 2) * 8,
                                  max_batch_tokens=512, use_cuda_graph=False, use_async_batching=False)
    model.generate_batch(encoded, generation_config=config, continuous_batching_config=cb, persistent_manager=True)
    started = time.perf_counter()
    outputs = model.generate_batch(level, generation_config=config, continuous_batching_config=cb,
                                   persistent_manager=True)
    wall = time.perf_counter() - started
    model.destroy_cached_continuous_batching_manager()
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    rows.append({"system": f"transformers generate_batch() {name}, the {len(level)} prompts of a level, "
                           f"{batch} at a time (offline, no HTTP)", "tok_s": tokens / wall, "req_s": len(level) / wall})
    native = load(None)
    if native.dtype != model.dtype:
        r = sequential_generate(native, encoded, args)
        rows.append({"system": f"transformers generate() {str(native.dtype).removeprefix('torch.')} (the "
                               f"checkpoint's dtype), one prompt at a time", **r})
    return [{**row, "threads": torch.get_num_threads()} for row in rows]


def reference_round(argv: list[str], round_: int) -> list[dict]:
    """One round of the reference rows, in a fresh process (no state from earlier rounds)."""
    done = subprocess.run([sys.executable, "-m", "bench", "serve", *argv, "--reference-only"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return [{"round": round_, **row} for row in json.loads(done.stdout.strip().splitlines()[-1])]


MEMORY_GAUGES = {  # /metrics sample -> the name printed
    'cadre_device_memory_peak_bytes': "GPU peak",
    'cadre_memory_budget_bytes{memory="device"}': "GPU budget",
    'cadre_memory_plan_bytes{part="expert_cache"}': "expert slots",
    'cadre_memory_plan_bytes{part="kv_cache"}': "KV cache",
    'cadre_host_tier_pinned_peak_bytes': "pinned host peak",
    'cadre_memory_plan_bytes{part="host_tier"}': "host tier cap",
}


def scrape_memory(url: str) -> dict[str, float]:
    """The server's peak GPU and pinned host memory beside its plan's budgets."""
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample in MEMORY_GAUGES:
            found[MEMORY_GAUGES[sample]] = float(value)
    return found


def fraction(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_results(levels: list[dict], reference: list[dict], description: str) -> None:
    print(f"\n{description}")
    print(f"{'round':>5} {'clients':>7} {'requests':>8} {'cut':>4} {'errors':>6} {'5xx':>4} {'req/s':>7} {'tok/s':>8} {'tok/req':>7} "
          f"{'p50 lat s':>9} {'p99 lat s':>9} {'p50 TTFT s':>10} {'p99 TTFT s':>10} {'hit rate':>8} {'loads/tok':>9}")
    for r in levels:
        if not r["requests"]:
            print(f"{r['round']:>5} {r['clients']:>7} {0:>8} {r.get('cut', 0):>4} {r['errors']:>6} {r['errors_5xx']:>4}  "
                  f"(no request completed; {r['tok_s']:.1f} tok/s streamed)")
            continue
        print(f"{r['round']:>5} {r['clients']:>7} {r['requests']:>8} {r.get('cut', 0):>4} {r['errors']:>6} {r['errors_5xx']:>4} "
              f"{r['req_s']:>7.2f} {r['tok_s']:>8.1f} {r['tokens_per_request']:>7.1f} {r['latency_p50']:>9.2f} "
              f"{r['latency_p99']:>9.2f} {r['ttft_p50']:>10.3f} {r['ttft_p99']:>10.3f} {fraction(r['hit_rate']):>8} "
              f"{r['loads'] / max(1, tokens_of(r)):>9.2f}")
    medians = {c: median(r["tok_s"] for r in levels if r["clients"] == c)
               for c in sorted({r["clients"] for r in levels})}
    print("median aggregate tok/s over rounds: " + ", ".join(f"{c} clients {t:.1f}" for c, t in medians.items()))
    if medians.get(1):
        for clients, tok_s in medians.items():
            if clients != 1:
                print(f"aggregate tok/s at {clients} clients = {tok_s / medians[1]:.2f} x 1 client (medians)")
    streaming = {c: [r["streaming_tok_s"] for r in levels if r["clients"] == c and r.get("streaming_tok_s")]
                 for c in medians}
    if any(streaming.values()):  # the start of a level (every client's prefill) left out
        print("median tok/s once every client streams: " + ", ".join(
            f"{c} clients {median(v):.1f}" for c, v in streaming.items() if v))
    for row in reference:
        print(f"reference round {row['round']}: {row['system']}: {row['tok_s']:.1f} tok/s, {row['req_s']:.2f} req/s, "
              f"{row['threads']} torch threads")
    for system in dict.fromkeys(row["system"] for row in reference):
        tok_s = median(row["tok_s"] for row in reference if row["system"] == system)
        print(f"reference median over rounds: {system}: {tok_s:.1f} tok/s")


def main(argv) -> int:
    args = parse_args(argv)
    if args.reference_only:
        print(json.dumps(reference_rows(args, prompts_for(args), max(int(c) for c in args.clients.split(",")))))
        return 0
    levels_wanted = [int(c) for c in args.clients.split(",")]
    prompts = prompts_for(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, port, max(levels_wanted))
    levels, reference, memory = [], [], {}
    with_reference = not (args.no_reference or args.store)
    load_before = os.getloadavg()[0]
    try:
        wait_ready(url, process)
        # Warm-up at the highest concurrency: first batches of each size allocate and settle
        # (one request a client, whatever --requests-per-client asks of the levels).
        warm = argparse.Namespace(**{**vars(args), "requests": max(levels_wanted), "requests_per_client": None})
        asyncio.run(run_level(url, max(levels_wanted), prompts, warm))
        for round_ in range(args.rounds):
            for clients in levels_wanted:
                profile = round_ == 0 and clients == args.profile
                levels.append({"round": round_ + 1, **asyncio.run(run_level(url, clients, prompts, args, profile))})
                if profile:
                    save_profile(levels[-1].pop("stacks"), clients, args)
                print(f"  round {round_ + 1}, {clients} clients: {levels[-1]['requests']} requests "
                      f"({levels[-1]['cut']} cut), "
                      f"{levels[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
            if with_reference:  # the server idles meanwhile (it holds no work)
                reference += reference_round(_provenance.without_outputs(argv), round_ + 1)
        memory = scrape_memory(url)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    model = args.store or args.model or "demo model"
    # Other work on the machine changes every figure: say how busy it was.
    description = (f"python -m bench serve: {model} on {args.device} (dtype {args.dtype}), "
                   f"{args.max_tokens} max new tokens, greedy, streaming /generate over loopback, "
                   + (f"GPU budget {args.gpu_memory}, host tier {args.host_memory or 'default'}"
                      if args.gpu_memory else f"cache {args.cache_fraction or 1.0:.0%} of experts")
                   + f", eviction {args.eviction}; "
                   f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} at the start, "
                   f"{os.getloadavg()[0]:.1f} at the end")
    print_results(levels, reference, description)
    if memory:
        print("server memory (from /metrics): " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()))
    if args.json:
        _provenance.write(args.json, "serve", argv, levels, load_before, reference=reference,
                          description=description, memory=memory)
    return 0 if all(r["errors_5xx"] == 0 for r in levels) else 1
