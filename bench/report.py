"""`python -m bench report [--check]`: the measured tables of docs/*.md, rendered from the
results files in bench/results/.

A table lives in a docs page between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`;
NAME is one of the renderers below, each of which reads its results file(s) and returns
markdown: the table, then one line saying where it came from (command, commit, machine,
date, load average). Without --check every block is rewritten in place. With --check
nothing is written; exit 1 (one stderr line per block) when a block differs from what
its files render, names no renderer, or a renderer has no block. CI runs the check
(tests/test_bench_report.py), so a table cannot disagree with its file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
REQUIRED = ("command", "commit", "machine", "date", "rows")
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL)

RENDERERS = {}


def renderer(name: str):
    def register(function):
        RENDERERS[name] = function
        return function
    return register


# ---- reading and formatting ----------------------------------------------------------------

def load(name: str, results: Path = RESULTS) -> dict:
    record = json.loads((results / f"{name}.json").read_text())
    missing = [key for key in REQUIRED if key not in record]
    if missing or not record["rows"]:
        raise ValueError(f"{name}.json: missing {missing or ['rows (empty)']}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]):
        raise ValueError(f"{name}.json: date {record['date']!r} is not YYYY-MM-DD")
    return record


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def source(name: str, record: dict) -> str:
    """The provenance line under a table."""
    load_avg = record.get("load_average")
    busy = f", load average {load_avg['before']:.1f} → {load_avg['after']:.1f}" if isinstance(load_avg, dict) else ""
    note = f" {record['note']}" if record.get("note") else ""
    return (f"<sub>`{record['command']}` · commit `{record['commit']}` · {record['machine']} · "
            f"{record['date']}{busy} · [`bench/results/{name}.json`](../bench/results/{name}.json){note}</sub>")


def pct(value, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# ---- the tables --------------------------------------------------------------------------

@renderer("decode-cpu")
def decode_cpu(results: Path) -> str:
    record = load("decode_cpu_demo", results)
    rows = record["rows"]
    best = max(r["tok_s"] for r in rows if r["system"].startswith("transformers"))
    body = [[r["system"], num(r["tok_s"], 1), f"{r['tok_s'] / best:.2f}×", pct(r.get("hit_rate")),
             num(r.get("loads_per_token"))] for r in rows]
    return (table(["system", "tok/s (median)", "vs transformers' best", "hit rate", "loads / token"], body)
            + "\n\n" + source("decode_cpu_demo", record))


def decode_gpu_table(name: str, results: Path) -> str:
    """A GPU decode run: every row's tok/s, hit rate, loads per token, copy-bound floor and
    GPU memory; failed configurations keep their error."""
    record = load(name, results)
    body = []
    for r in record["rows"]:
        if "error" in r:
            body.append([r["system"], "failed: " + r["error"]] + ["—"] * 8)
            continue
        floor, decode_floor = r.get("copy_floor_tok_s"), r.get("decode_copy_floor_tok_s")
        body.append([r["system"], num(r["tok_s"], 1), num(r.get("ttft_ms"), 0), num(r.get("decode_tok_s"), 1),
                     pct(r.get("hit_rate")), num(r.get("loads_per_token")), num(r.get("decode_loads_per_token"), 1),
                     num(floor, 0) if floor else "—", num(decode_floor, 0) if decode_floor else "—",
                     num(r.get("gpu_peak_gib"))])
    batch = record.get("batch", 1)
    head = f"batch {batch}" + (f", pinned H2D {record['h2d_bytes_per_s'] / 1e9:.1f} GB/s"
                               if record.get("h2d_bytes_per_s") else "")
    return (f"*{head}; tok/s end to end, then apart: time to first token (the prompt's prefill) and the "
            f"decode rate after it (— where the run predates that split)*\n\n"
            + table(["system", "tok/s", "TTFT ms", "decode tok/s", "hit rate", "loads / token", "decode loads / token",
                     "copy floor tok/s", "decode copy floor", "GPU peak GiB"], body) + "\n\n" + source(name, record))


for _name in ("decode_h200_8l_b1", "decode_h200_8l_25pct", "decode_h200_8l_fp8", "decode_h200_full", "decode_h200_full24", "decode_h200_full_fp8",
              "decode_h200_full16"):
    renderer(_name.replace("_", "-"))(lambda results, _name=_name: decode_gpu_table(_name, results))


@renderer("decode-h200-full24-reads")
def decode_h200_full24_reads(results: Path) -> str:
    """The 24 GiB row before and after parallel store reads, in the order the runs were made:
    one lease's pair, then another's two pairs on one warm machine."""
    body, sources = [], []
    runs = [("base_0", 1), ("main_0", 1), ("base_1", 2), ("main_1", 2), ("base_2", 2), ("main_2", 2)]
    for order, (run, lease) in enumerate(runs, 1):
        name = f"decode_h200_full24_reads_{run}"
        record = load(name, results)
        row = record["rows"][0]  # the plain row (main_0 also has a prefetch row, in decode_h200_full24's table)
        split = row.get("split_us", {})
        body.append([order, lease, f"`{record['commit']}`", "one thread" if run.startswith("base") else "parallel",
                     num(row["tok_s"], 1), num(row["decode_tok_s"], 1), num(split.get("sync"), 0),
                     num(split.get("issue"), 0), num(split.get("after"), 0)])
        sources.append(source(name, record))
    return (table(["run", "lease", "commit", "a store read", "tok/s", "decode tok/s", "µs waiting for routing",
                   "µs deciding and queuing loads", "µs after"], body)
            + "\n\n*host µs per MoE layer that can miss, per replayed decode step*\n\n" + "\n\n".join(sources))


@renderer("decode-h200-full24-host-path")
def decode_h200_full24_host_path(results: Path) -> str:
    """The 24 GiB rows of 2026-12-01, in the order they ran (each run a lease call of its own, the store
    written just before): the speculation queued behind the next piece; the run py-spy sampled; a
    host tier holding the whole store; the code before and after pinning the tier up front; then
    (one later call) speculative store reads into the host tier, and device prefetch predicted
    inside the graph; then (a later session) an alternated A/B of f1fc658's staged table writes,
    and f1fc658's three prefetch settings and its run under py-spy --gil (one call)."""
    runs = [("decode_h200_full24_prefetch_e4ffb6a", "speculation behind the piece"),
            ("decode_h200_full24_host64", "host tier 64 GiB (holds the store)"),
            ("decode_h200_full24_spy", "under py-spy"),
            ("decode_h200_full24_pin_base", "A/B: before pinning up front"),
            ("decode_h200_full24_pin_main", "A/B: tier pinned up front, headers parsed once"),
            ("decode_h200_full24_prefetch_host", "store reads into the host tier ahead of need"),
            ("decode_h200_full24_prefetch_fc551be", "prediction inside the graph, loads to the device"),
            ("decode_h200_full24_staged_base_1", "A/B: before staged table writes"),
            ("decode_h200_full24_staged_main_1", "A/B: staged table writes, one event a batch"),
            ("decode_h200_full24_staged_base_2", "A/B: before staged table writes"),
            ("decode_h200_full24_staged_main_2", "A/B: staged table writes, one event a batch"),
            ("decode_h200_full24_f1fc658", "device and host prefetch, same call"),
            ("decode_h200_full24_spy_gil", "under py-spy --gil")]
    body, sources = [], []
    for name, what in runs:
        record = load(name, results)
        for row in record["rows"]:
            split = row.get("split_us", {})
            prefetch = row["system"].partition("prefetch ")[2].partition(",")[0] or "—"
            body.append([f"`{record['commit']}`", what, f"{row['host_cap_gib']:.0f}", prefetch, num(row["tok_s"], 1),
                         num(row["decode_tok_s"], 1), num(row["decode_loads_per_token"], 1),
                         num(row["disk_loads_per_token"], 1), num(split.get("sync"), 0), num(split.get("issue"), 0),
                         num(split.get("after"), 0)])
        sources.append(source(name, record))
    return (table(["commit", "run", "host GiB", "prefetch", "tok/s", "decode tok/s", "decode loads / token",
                   "store reads / token", "µs waiting for routing", "µs deciding and queuing loads", "µs after"], body)
            + "\n\n*24 GiB GPU; host µs per MoE layer that can miss, per replayed decode step*\n\n"
            + "\n\n".join(sources))


@renderer("cache-host-cpu")
def cache_host_cpu(results: Path) -> str:
    """The cache's host time per MoE layer, before and after a9a1d69 (layer-lru's victims), by
    policy and batch, on the same VM one after the other."""
    body, sources = [], []
    for name, code in (("cache_host_cpu_before", "before"), ("cache_host_cpu", "after"),
                       ("cache_host_cpu_slice", "after")):
        record = load(name, results)
        for r in record["rows"]:
            geometry = f"{record['layers']} layers, {r['slots'] / r['experts']:.0%} in slots" + \
                ("" if r.get("exclusive", True) else ", tier holds the store")
            body.append([f"`{record['commit']}` ({code})", geometry, r["policy"], r["batch"], num(r["us_per_layer"], 0),
                         num(r["us_per_load"], 1), num(r["loads_per_layer"], 1), pct(r["hit_rate"])])
        sources.append(source(name, record))
    return (table(["code", "geometry", "eviction", "batch", "host µs / MoE layer", "µs / load", "loads / layer",
                   "hit rate"], body)
            + "\n\n" + "\n\n".join(sources))


@renderer("serve-h200-full")
def serve_h200_full(results: Path) -> str:
    """The server at full depth under 24 GiB GPU + 32 GiB host: each level's round (a level whose
    requests were all cut at its timeout counts the tokens it streamed)."""
    record = load("serve_h200_full", results)
    one = record["rows"][0]["tok_s"]
    body = [[r["clients"], r["requests"], r["cut"], r["errors"], num(r["tok_s"], 1), f"{r['tok_s'] / one:.2f}×",
             num(r.get("streaming_tok_s"), 1),  # (— where the run predates it)
             num(r["ttft_p50"], 2) if r["requests"] else "—", num(r["latency_p50"], 1) if r["requests"] else "—",
             pct(r["hit_rate"]), num(r["loads"] / max(1, tokens_of(r)), 1)] for r in record["rows"]]
    memory = {name: value / 2**30 for name, value in record.get("memory", {}).items()}  # bytes, from /metrics
    peaks = (f"\n\n*from the server's /metrics: GPU peak {memory['GPU peak']:.2f} GiB of a {memory['GPU budget']:.0f} GiB "
             f"budget, pinned host peak {memory['pinned host peak']:.2f} GiB of a {memory['host tier cap']:.0f} GiB cap*"
             if {"GPU peak", "GPU budget", "pinned host peak", "host tier cap"} <= set(memory) else "")
    return (table(["clients", "requests done", "cut", "errors", "tok/s (aggregate)", "vs 1 client",
                   "tok/s once every client streams", "TTFT p50 s", "latency p50 s", "hit rate", "loads / token"], body)
            + peaks + "\n\n" + source("serve_h200_full", record))


@renderer("decode-h200-8l-b16")
def decode_h200_8l_b16(results: Path) -> str:
    """Batch 16: the stage's run, then cadre's compiled step beside the stronger reference."""
    return "\n\n".join(decode_gpu_table(name, results) for name in ("decode_h200_8l_b16", "decode_h200_8l_b16_compiled"))


@renderer("breakdown-h200-8l")
def breakdown_h200(results: Path) -> str:
    return breakdown_table("breakdown_h200_8l", results)


@renderer("breakdown-h200-full")
def breakdown_h200_full(results: Path) -> str:
    """Without prefetch, then with the next MoE layer's experts predicted and loaded ahead."""
    return "\n\n".join(breakdown_table(name, results) for name in ("breakdown_h200_full", "breakdown_h200_full_prefetch"))


def breakdown_table(name: str, results: Path) -> str:
    """bench breakdown's rows; the write-back column where the run measured it (since f3eeefd)."""
    record = load(name, results)
    writebacks = all("writeback_us" in r for r in record["rows"])
    head = ["system", "wall µs / token", "compute", "copies"] + (["write-backs"] if writebacks else []) + \
        ["GPU idle", "idle / MoE layer", "loads / token"]
    body = [[r["system"], num(r["wall_us"], 0), num(r["compute_us"], 0), num(r["copy_us"], 0)]
            + ([num(r["writeback_us"], 0)] if writebacks else [])
            + [num(r["idle_us"], 0), num(r["idle_us_per_moe_layer"], 0), num(r["loads_per_token"])]
            for r in record["rows"]]
    return table(head, body) + "\n\n" + source(name, record)


@renderer("kernels-h200-8l")
def kernels_h200_8l(results: Path) -> str:
    """bench kernels: per token, the two systems' totals, then the kernels whose GPU time differs most."""
    record = load("kernels_h200_8l", results)
    ref, cadre = record["rows"]
    apart = all("prefill_ms" in r for r in record["rows"])  # runs that timed prefill and steps apart
    totals = table(["system"] + (["prefill ms", "decode step µs"] if apart else [])
                   + ["wall µs / token (profiled)", "kernels / token", "GPU kernel µs / token"],
                   [[r["system"]] + ([num(r["prefill_ms"]), num(r["step_us"], 0)] if apart else [])
                    + [num(r["wall_us"], 0), num(r["kernels"], 0), num(r["gpu_us"], 0)] for r in record["rows"]])
    names = set(ref["by_kernel"]) | set(cadre["by_kernel"])
    gap = lambda n: abs(cadre["by_kernel"].get(n, [0, 0])[1] - ref["by_kernel"].get(n, [0, 0])[1])
    body = []
    for name in sorted(names, key=gap, reverse=True)[:8]:
        (rn, rt), (cn, ct) = ref["by_kernel"].get(name, [0, 0]), cadre["by_kernel"].get(name, [0, 0])
        body.append([f"`{name[:60]}`", num(rn), num(rt), num(cn), num(ct)])
    kernels = table(["kernel (first 60 characters)", "transformers n", "µs", "cadre n", "µs"], body)
    return totals + "\n\n" + kernels + "\n\n" + source("kernels_h200_8l", record)


def tokens_of(level: dict) -> float:
    """Tokens a bench serve level streamed (rows from before `tokens` was recorded: its completed
    requests' only, which were all it counted then)."""
    return level.get("tokens", level["tokens_per_request"] * level["requests"])


def serve_levels(record: dict) -> dict[int, dict]:
    """Medians over the rounds, per concurrency level."""
    by_clients = {}
    for clients in sorted({r["clients"] for r in record["rows"]}):
        runs = [r for r in record["rows"] if r["clients"] == clients]
        by_clients[clients] = {key: median(r[key] for r in runs) for key in
                               ("tok_s", "req_s", "latency_p50", "latency_p99", "ttft_p50", "ttft_p99")}
        by_clients[clients]["errors"] = sum(r["errors"] for r in runs)
        by_clients[clients]["rounds"] = len(runs)
        by_clients[clients]["hit_rate"] = median(r["hit_rate"] for r in runs)
        by_clients[clients]["loads_per_token"] = median(r["loads"] / max(1, tokens_of(r)) for r in runs)
    return by_clients


@renderer("serve-h200-8l")
def serve_h200_8l(results: Path) -> str:
    """The server on the GPU at 25% and 100% of experts: aggregate tok/s per concurrency level."""
    body, sources = [], []
    for name, budget in (("serve_h200_8l_25pct", "25%"), ("serve_h200_8l_25pct_rpc24", "25%, 24 requests a client"),
                         ("serve_h200_8l_100pct", "100%")):
        record = load(name, results)
        levels = serve_levels(record)
        one = levels[min(levels)]["tok_s"]
        body += [[budget, clients, num(level["tok_s"], 1), f"{level['tok_s'] / one:.2f}×", num(level["ttft_p50"], 3),
                  num(level["latency_p50"], 2), pct(level["hit_rate"]), num(level["loads_per_token"]), level["errors"]]
                 for clients, level in levels.items()]
        sources.append(source(name, record))
    return (table(["experts on GPU", "clients", "tok/s (aggregate)", "vs 1 client", "TTFT p50 s", "latency p50 s",
                   "hit rate", "loads / token", "errors"], body) + "\n\n" + "\n\n".join(sources))


@renderer("ray-scaling-h200x2")
def ray_scaling_h200x2(results: Path) -> str:
    """Ray Serve on the 2-GPU machine: one replica against one per H200, each router."""
    record = load("ray_scaling_h200x2", results)
    one = record["rows"][0]["tok_s"]
    body = [[row["replicas"], row["router"], row["requests"], row["errors"], num(row["tok_s"], 1),
             f"{row['tok_s'] / one:.2f}×", num(row["latency_p50"], 2), num(row["latency_p99"], 2),
             pct(row["hit_rate"]), num(row["loads_per_token"])] for row in record["rows"]]
    return (table(["replicas", "router", "requests", "errors", "tok/s (aggregate)", "vs 1 replica", "latency p50 s",
                   "latency p99 s", "hit rate", "loads / token"], body) + "\n\n" + source("ray_scaling_h200x2", record))


@renderer("affinity-bound-mixed")
def affinity_bound_mixed(results: Path) -> str:
    """The demo model, its mixed-text fine-tune and the same architecture trained on mixed text from
    random weights: how far apart the sources route, and the best placement of whole requests by
    source against round-robin (bench affinity-bound)."""
    tuned, scratch = load("mixed_demo_cpu", results), load("mixed_scratch_cpu", results)
    gpu, aux = load("mixed_scratch_h200", results), load("mixed_scratch_aux_cpu", results)
    fine, finer = load("mixed_scratch_64_cpu", results), load("mixed_scratch_128_cpu", results)
    bounds = {name: load(name, results) for name in ("affinity_bound_cpu_demo", "affinity_bound_cpu_mixed_demo",
                                                     "affinity_bound_cpu_mixed_scratch",
                                                     "affinity_bound_h200_mixed_scratch",
                                                     "affinity_bound_cpu_mixed_aux", "affinity_bound_cpu_mixed_64")}
    by_level = bound_by_concurrency(load("affinity_bound_cpu_mixed_128_concurrency", results))
    bounds["128 experts, 4 at a time"] = {"best_over_round_robin": by_level[4][1]}
    models = [("demo (Shakespeare only)", tuned["rows"][0], "affinity_bound_cpu_demo"),
              ("demo fine-tuned on mixed text, 300 steps", tuned["rows"][1], "affinity_bound_cpu_mixed_demo"),
              ("demo's shapes trained on mixed text from random weights, 900 steps", scratch["rows"][1],
               "affinity_bound_cpu_mixed_scratch"),
              ("the same on the H200, 3000 steps of 4x the batch", gpu["rows"][1], "affinity_bound_h200_mixed_scratch"),
              ("900 steps on the CPU, balancing loss 0.001 (not 0.01)", aux["rows"][1], "affinity_bound_cpu_mixed_aux"),
              ("900 steps on the CPU, 64 experts of half the width a layer (top-4)", fine["rows"][1],
               "affinity_bound_cpu_mixed_64"),
              ("900 steps on the CPU, 128 experts of a quarter of the width (top-8)", finer["rows"][1],
               "128 experts, 4 at a time")]
    body = [[label, num(row["separation_bits"], 3),
             " / ".join(num(row["loss"][k]) for k in ("shakespeare", "code", "prose")),
             f"{bounds[bound]['best_over_round_robin']:.2f}×"] for label, row, bound in models]
    sources = [("mixed_demo_cpu", tuned), ("mixed_scratch_cpu", scratch), ("mixed_scratch_h200", gpu),
               ("mixed_scratch_aux_cpu", aux), ("mixed_scratch_64_cpu", fine), ("mixed_scratch_128_cpu", finer)] \
        + [(name, record) for name, record in bounds.items() if "command" in record]  # the 128's: the next table
    return (table(["model", "routing separation, bits (of 1.58)", "loss: Shakespeare / code / prose",
                   "best placement by source / round-robin"], body)
            + "\n\n" + "\n\n".join(source(name, record) for name, record in sources))


@renderer("affinity-bound-concurrency")
def affinity_bound_concurrency(results: Path) -> str:
    """The bound on the 64- and 128-expert mixed models at each number of requests a replica serves
    at once: round-robin's hit rate, the best placement by source, and their ratio (each model's
    traces replayed at every level; the 64's also decoded to 64 tokens a request)."""
    record = load("affinity_bound_cpu_mixed_64_concurrency", results)
    finer = load("affinity_bound_cpu_mixed_128_concurrency", results)
    body = [["64", level, *cells] for level, (cells, _) in bound_by_concurrency(record).items()]
    two = load("affinity_bound_cpu_mixed_64_two_sources", results)  # the two sources that route most apart
    rows = two["rows"]
    body.append(["64", f"{two['concurrency']}, Macbeth and Python source only", pct(rows[0]["hit_rate"]),
                 pct(rows[1]["hit_rate"]), split_name(rows[1]), f"{two['best_over_round_robin']:.2f}×"])
    longer = load("affinity_bound_cpu_mixed_64_tokens64", results)  # the same workload, 64 tokens a request
    body += [["64", f"{level}, 64 new tokens a request", *cells]
             for level, (cells, _) in bound_by_concurrency(longer).items()]
    body += [["128", level, *cells] for level, (cells, _) in bound_by_concurrency(finer).items()]
    return (table(["experts a layer", "requests a replica serves at once", "round-robin hit rate", "best by source",
                   "split", "best / round-robin"], body)
            + "\n\n" + "\n\n".join(source(name, r) for name, r in (
                ("affinity_bound_cpu_mixed_64_concurrency", record), ("affinity_bound_cpu_mixed_64_two_sources", two),
                ("affinity_bound_cpu_mixed_64_tokens64", longer), ("affinity_bound_cpu_mixed_128_concurrency", finer))))


def bound_by_concurrency(record: dict) -> dict:
    """{requests at once: ([round-robin hit rate, best by source, its split, ratio], ratio)} of an
    affinity-bound record over several concurrency levels: table cells, and the ratio as a number."""
    levels = {}
    for level in record["concurrency"]:
        rows = [r for r in record["rows"] if r["concurrency"] == level]
        best = max(rows[1:], key=lambda r: r["hit_rate"])
        ratio = best["hit_rate"] / rows[0]["hit_rate"]
        levels[level] = ([pct(rows[0]["hit_rate"]), pct(best["hit_rate"]), split_name(best), f"{ratio:.2f}×"], ratio)
    return levels


def split_name(row: dict) -> str:
    return row["placement"].removeprefix("by source: ").replace(" | ", " vs ")


@renderer("affinity-cpu-mixed")
def affinity_cpu_mixed(results: Path) -> str:
    """bench affinity live on the mixed-text models: each router's medians over the rounds, and how
    often it sent a request to its favourite replica."""
    body, sources = [], []
    for name, model in (("affinity_cpu_mixed_demo", "demo fine-tuned"), ("affinity_cpu_mixed_scratch", "from scratch"),
                        ("affinity_cpu_mixed_scratch_imbalance2", "from scratch, --affinity-imbalance 2"),
                        ("affinity_cpu_mixed_64_imbalance0", "64 finer experts"),
                        ("affinity_cpu_mixed_64_imbalance2", "64 finer experts, --affinity-imbalance 2"),
                        ("affinity_cpu_mixed_64_r4_imbalance0", "64 finer experts, 4 rounds"),
                        ("affinity_cpu_mixed_64_r4_imbalance2", "64 finer experts, 4 rounds, --affinity-imbalance 2"),
                        ("affinity_cpu_mixed_64_c16_imbalance2",
                         "64 finer experts, 16 clients, 4 rounds, --affinity-imbalance 2"),
                        ("affinity_cpu_mixed_64_c16_imbalance4",
                         "64 finer experts, 16 clients, 4 rounds, --affinity-imbalance 4")):
        record = load(name, results)
        body += [[model, router, pct(m["hit_rate"]), num(m["loads_per_token"]), num(m["tok_s"], 1),
                  f"{m['latency_p99']:.2f} s"] for router, m in record["summary"].items()]
        sources.append(source(name, record))
    return (table(["model", "router", "hit rate", "loads / token", "tok/s", "p99 latency"], body) + "\n\n"
            + "\n\n".join(sources))


@renderer("serve-cpu")
def serve_cpu(results: Path) -> str:
    record = load("serve_cpu_demo", results)
    levels = serve_levels(record)
    one = levels[min(levels)]["tok_s"]
    body = [[c, num(v["tok_s"], 1), f"{v['tok_s'] / one:.2f}×", num(v["req_s"]), num(v["latency_p50"]),
             num(v["latency_p99"]), num(1000 * v["ttft_p50"], 0), num(1000 * v["ttft_p99"], 0), v["errors"]]
            for c, v in levels.items()]
    return (table(["clients", "tok/s", "vs 1 client", "req/s", "p50 latency s", "p99 latency s", "p50 TTFT ms",
                   "p99 TTFT ms", "errors"], body) + "\n\n" + source("serve_cpu_demo", record))


@renderer("serve-cpu-reference")
def serve_cpu_reference(results: Path) -> str:
    record = load("serve_cpu_demo", results)
    levels = serve_levels(record)
    most = max(levels)
    body = []
    for system in dict.fromkeys(r["system"] for r in record["reference"]):
        runs = [r for r in record["reference"] if r["system"] == system]
        tok_s = median(r["tok_s"] for r in runs)
        body.append([system, num(tok_s, 1), len(runs), f"{levels[most]['tok_s'] / tok_s:.2f}×"])
    body.append([f"cadre server, {most} streaming clients (table above)", num(levels[most]["tok_s"], 1),
                 levels[most]["rounds"], "1.00×"])
    return (table(["system (same run, interleaved)", "tok/s (median)", "rounds", f"cadre at {most} clients / this"],
                  body) + "\n\n" + source("serve_cpu_demo", record))


@renderer("serve-eviction-cpu")
def serve_eviction_cpu(results: Path) -> str:
    body, sources = [], []
    for eviction in ("lru", "layer-lru"):
        name = f"serve_cpu_demo_25pct_{eviction}"
        record = load(name, results)
        for clients, v in serve_levels(record).items():
            body.append([f"`{eviction}`", clients, pct(v["hit_rate"]), num(v["loads_per_token"]), num(v["tok_s"], 1)])
        sources.append(source(name, record))
    return (table(["eviction", "clients", "hit rate", "loads / token", "tok/s"], body) + "\n\n"
            + "<br>\n".join(sources))


@renderer("quality")
def quality(results: Path) -> str:
    record = load("quality_cpu_demo", results)
    body = [["transformers, all experts (reference)", 32, 4, num(record["reference_ppl"], 3), "—", "—", "—", "—"]]
    body += [[r["name"], r["experts_per_layer"], num(r["experts_per_token"]), num(r["ppl"], 3),
              pct(r["top1_agreement"], 2), pct(r["hit_rate"], 2), num(r["loads_per_token"]),
              num(r["regret_per_token"])] for r in record["rows"]]
    return (table(["configuration", "experts held / layer", "experts run / token / layer", "ppl", "top-1 agreement",
                   "hit rate", "loads / token", "regret / token"], body) + "\n\n" + source("quality_cpu_demo", record))


def policy_rows(rows: list[dict]) -> list[list]:
    return [[f"{r['budget']:.1%}".replace(".0%", "%"), r["eviction"], "speculative" if r["prefetch"] else "off",
             pct(r["hit_rate"], 2), num(r["loads_per_token"]), num(r["mb_per_token"], 3), pct(r["precision"]),
             pct(r["recall"]), num(r["tokens_per_s"], 1)] for r in rows]


POLICY_HEADERS = ["budget", "eviction", "prefetch", "hit rate", "loads / token", "MB moved / token",
                  "prefetch precision", "prefetch recall", "tokens/s"]


def policies_table(name: str, results: Path) -> str:
    record = load(name, results)
    return (table(POLICY_HEADERS, policy_rows(record["rows"])) + "\n\n"
            + f"transformers, every expert in memory, same tokens in the same run: "
              f"{record['reference_tokens_per_s']:.1f} tokens/s.\n\n" + source(name, record))


renderer("policies-batch1")(lambda results: policies_table("policies_cpu_demo", results))
renderer("policies-batch16")(lambda results: policies_table("policies_batch16_cpu_demo", results))


@renderer("policies-surprise")
def policies_surprise(results: Path) -> str:
    record = load("policies_cpu_demo", results)
    body = [[r["name"], pct(r["hit_rate"], 2), num(r["loads_per_token"]), pct(r["precision"]), pct(r["recall"])]
            for r in record["widening"]]
    return (table(["predicted set (25% budget, lru, speculative prefetch)", "hit rate", "loads / token", "precision",
                   "recall"], body) + "\n\n" + source("policies_cpu_demo", record))


@renderer("locality")
def locality(results: Path) -> str:
    record = load("locality_demo", results)
    mean = next(r for r in record["rows"] if r["layer"] == "mean")
    sizes = sorted(int(k[3:]) for k in mean if re.fullmatch(r"lru\d+", k))
    body = [["demo model", f"**{mean['overlap']:.3f}**", *(f"**{mean[f'lru{c}']:.3f}**" for c in sizes)],
            ["uniform random routing (analytic)", f"{mean['overlap_analytic']:.3f}",
             *(f"{mean[f'lru{c}_analytic']:.3f}" for c in sizes)],
            ["uniform random routing (seeded simulation)", f"{mean['overlap_random']:.3f}",
             *(f"{mean[f'lru{c}_random']:.3f}" for c in sizes)],
            ["static cache of the most-used experts (oracle)", "—", *(f"{mean[f'static{c}']:.3f}" for c in sizes)]]
    return (table(["mean of the layers", "overlap", *(f"LRU {c}" for c in sizes)], body) + "\n\n"
            + f"{record['tokens']:,} held-out tokens.\n\n" + source("locality_demo", record))


@renderer("demo-perplexity")
def demo_perplexity(results: Path) -> str:
    record = load("demo_training_h100", results)
    body = [[r["model"], r["parameters"], num(r["validation_ppl"], 1), f"**{r['test_ppl']:.1f}**",
             num(r["test_nll"], 3)] for r in record["rows"]]
    return (table(["model", "parameters (active)", "validation ppl", "**test ppl**", "test nll (nats/token)"], body)
            + "\n\n" + source("demo_training_h100", record))


@renderer("demo-utilisation")
def demo_utilisation(results: Path) -> str:
    record = load("demo_utilisation", results)
    rows = record["rows"]
    body = [["experts used", *(r["experts_used"] for r in rows)],
            ["min load", *(f"{r['min_load']:.2f}" for r in rows)],
            ["max load", *(f"{r['max_load']:.2f}" for r in rows)]]
    return (table(["layer", *(r["layer"] for r in rows)], body) + "\n\n"
            + f"{record['tokens']:,} held-out tokens; test ppl {record['ppl']:.1f}.\n\n"
            + source("demo_utilisation", record))


@renderer("synth-calibration")
def synth_calibration(results: Path) -> str:
    """bench synth-calibrate: each spread's routing beside the demo model's and uniform random's."""
    record = load("synth_calibration_cpu", results)
    config = json.loads((REPO / "bench" / "configs" / f"{record['config']}.json").read_text())
    experts, top_k = config["num_experts"], config["num_experts_per_tok"]

    def row(label, r):
        return [label, f"{r['entropy']:.3f}", f"{r['overlap']:.3f}",
                " / ".join(f"{r[key]:.3f}" for key in ("lru25", "lru50", "lru75"))]

    body = [row("demo model (the target)", record["rows"][0]),
            ["uniform random (analytic)", "1.000", f"{top_k / experts:.4f}", "0.250 / 0.500 / 0.750"]]
    for r in record["rows"][1:]:
        label = f"embed_std {r['embed_std']}" + (" (the default)" if r["system"] == record["best"] else "")
        body.append(row(f"**{label}**" if r["system"] == record["best"] else label, r))
    return (table(["routing", "entropy / log E", "overlap with the previous token",
                   "LRU hit rate at 25% / 50% / 75% of a layer's experts"], body) + "\n\n"
            + f"{record['config']} at its width, {record['layers']} layers; {record['tokens']:,} held-out tokens.\n\n"
            + source("synth_calibration_cpu", record))


@renderer("results-index")
def results_index(results: Path) -> str:
    body = []
    for path in sorted(results.glob("*.json")):
        record = load(path.stem, results)
        load_avg = record.get("load_average")
        busy = f"{load_avg['before']:.1f} → {load_avg['after']:.1f}" if isinstance(load_avg, dict) else "—"
        log = "yes" if path.with_suffix(".log").is_file() else "**missing**"
        body.append([f"[`{path.stem}`](../bench/results/{path.name})", f"`{record['command']}`",
                     f"`{record['commit']}`", record["machine"], record["date"], busy, log])
    return table(["results", "command", "commit", "machine", "date", "load average", ".log"], body)


# ---- rendering the docs ------------------------------------------------------------------

def render_page(text: str, results: Path) -> tuple[str, list[str], set[str]]:
    """(page with every block rendered, problems, block names seen)."""
    problems, seen = [], set()

    def fill(match: re.Match) -> str:
        name = match["name"]
        seen.add(name)
        if name not in RENDERERS:
            problems.append(f"no renderer named {name!r}")
            return match[0]
        return f"{match[1]}{RENDERERS[name](results)}\n{match[4]}"

    return BLOCK.sub(fill, text), problems, seen


def report(check: bool, docs: Path = DOCS, results: Path = RESULTS) -> list[str]:
    """Render (or, with check, compare) every block of docs/*.md; returns the problems."""
    problems, seen = [], set()
    for page in sorted(docs.glob("*.md")):
        text = page.read_text()
        rendered, page_problems, names = render_page(text, results)
        seen |= names
        problems += [f"{page.relative_to(docs.parent)}: {p}" for p in page_problems]
        if rendered != text:
            if check:
                stale = [m["name"] for m in BLOCK.finditer(text)
                         if m[0] not in rendered]
                problems += [f"{page.relative_to(docs.parent)}: table {n!r} differs from what "
                             f"bench/results renders (run python -m bench report)" for n in stale]
            else:
                page.write_text(rendered)
    problems += [f"renderer {name!r} has no <!-- bench:{name} --> block in docs/" for name in sorted(set(RENDERERS) - seen)]
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    try:
        problems = report(args.check)
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench report: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"bench report: every table in docs/ {'matches' if args.check else 'rendered from'} bench/results/")
    return 1 if problems else 0
