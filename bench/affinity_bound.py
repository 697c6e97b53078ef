"""How much any request router could raise the expert-cache hit rate on a model: a bound.

    python -m bench affinity-bound [--store STORE] [--per-source 24] [--max-tokens 24] [--sources a,b]
                                   [--replicas 2] [--cache-fraction 0.25] [--concurrency 4[,8,...]] [--json FILE]

`bench affinity` measures the expert-affinity router against power-of-two-choices and
round-robin on live replicas. When affinity gains little, is the router at fault or the
model? This replays the model's own routing, measured, through simulated replicas, so the
question has a number: each request of `bench affinity`'s workload (four sources, each with
its own prompts) is generated greedily by the runtime with every expert resident, and every
forward's experts per MoE layer are recorded (the prefill's and each decode step's). Then N
replicas, each a per-layer LRU cache of `cache-fraction` of a layer's experts (the server's
layer-lru policy) serving `concurrency` requests at a time, replay those steps under each
placement:

- round-robin: the i-th request to arrive to replica i mod N (what power-of-two-choices does when
  queues are even);
- by source (oracle): every request of a source to one replica, the best split of sources over
  replicas; a router that knew each request's source perfectly, and ignored load, gets this.

A batch step looks up the distinct experts its requests chose per layer (as the cache counts
queries), then they become most recent. If the oracle's hit rate is not well above
round-robin's, no router that places whole requests can do better on this model: the sources
do not route differently enough, or their continuations route alike.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections import OrderedDict
from pathlib import Path

from bench import _provenance

Step = dict[int, frozenset[int]]  # MoE layer -> distinct experts one forward of one request chose


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench affinity-bound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="expert store (default: the demo model)")
    p.add_argument("--per-source", type=int, default=24, help="requests per source")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--prompt-chars", type=int, default=160)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cache-fraction", type=float, default=0.25)
    p.add_argument("--concurrency", default="4",
                   help="requests a replica serves at once (comma-separated: the same traces replayed at each)")
    p.add_argument("--sources", default="",
                   help="only these of the workload's sources (comma-separated: macbeth, twelfth-night, prose, code; "
                        "default: all four)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


# --- the simulation (pure) -------------------------------------------------------------------
class LayerLRU:
    """One replica's cache: per MoE layer, an LRU of `capacity` experts."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.layers: dict[int, OrderedDict[int, None]] = {}
        self.hits = self.queries = 0

    def step(self, chosen: dict[int, set[int]]) -> None:
        for layer, experts in chosen.items():
            cache = self.layers.setdefault(layer, OrderedDict())
            self.queries += len(experts)
            self.hits += sum(e in cache for e in experts)
            for e in sorted(experts):
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > self.capacity:
                cache.popitem(last=False)


def replay(requests: list[list[Step]], capacity: int, concurrency: int) -> LayerLRU:
    """Serve `requests` (each a list of forwards) in order, `concurrency` at a time: every batch
    step runs one forward of each active request; a finished request's place goes to the next."""
    cache, queue, active = LayerLRU(capacity), list(requests), []
    while queue or active:
        while queue and len(active) < concurrency:
            active.append(iter(queue.pop(0)))
        chosen: dict[int, set[int]] = {}
        for request in list(active):
            step = next(request, None)
            if step is None:
                active.remove(request)
                continue
            for layer, experts in step.items():
                chosen.setdefault(layer, set()).update(experts)
        cache.step(chosen)
    return cache


def hit_rate(caches: list[LayerLRU]) -> float:
    queries = sum(c.queries for c in caches)
    return sum(c.hits for c in caches) / queries if queries else 0.0


def placements(traces: dict[str, list[list[Step]]], replicas: int, seed: int = 0) -> dict[str, list[list[list[Step]]]]:
    """{placement: per replica, its requests in arrival order}. Requests arrive in a seeded random
    order over the sources, as `bench affinity`'s independent clients send them (in strict turns,
    round-robin over an even number of sources would itself place by source)."""
    arrivals = [(source, r) for source, requests in traces.items() for r in requests]
    random.Random(seed).shuffle(arrivals)
    placed = {"round-robin": [[r for i, (_, r) in enumerate(arrivals) if i % replicas == k] for k in range(replicas)]}
    sources = list(traces)
    for split in _splits(sources, replicas):
        home = {source: k for k, group in enumerate(split) for source in group}
        name = "by source: " + " | ".join("+".join(group) for group in split)
        placed[name] = [[r for s, r in arrivals if home[s] == k] for k in range(replicas)]
    return placed


def _splits(sources: list[str], replicas: int):
    """Every way to put the sources on `replicas` replicas, each holding at least one (up to order)."""
    seen = set()
    for homes in itertools.product(range(replicas), repeat=len(sources)):
        groups = tuple(tuple(s for s, h in zip(sources, homes) if h == k) for k in range(replicas))
        key = frozenset(groups)
        if all(groups) and key not in seen:
            seen.add(key)
            yield groups


def simulate(traces: dict[str, list[list[Step]]], replicas: int, capacity: int, concurrency: int) -> list[dict]:
    rows = []
    for name, per_replica in placements(traces, replicas).items():
        caches = [replay(requests, capacity, concurrency) for requests in per_replica]
        rows.append({"placement": name, "hit_rate": hit_rate(caches),
                     "requests": [len(requests) for requests in per_replica]})
    return rows


# --- the measured routing ----------------------------------------------------------------------
def record_traces(store: str, prompts: dict[str, list[str]], max_tokens: int) -> dict[str, list[list[Step]]]:
    """Per source, per request, per forward: the experts each MoE layer chose (greedy decode,
    every expert resident: the routing does not depend on the budget)."""
    from models import Runtime, RuntimeConfig

    runtime = Runtime.from_store(store, RuntimeConfig(device="cpu", cache_fraction=1.0))
    first_layer = min(runtime.store.moe_layers)
    forwards: list[Step] = []

    def listen(event) -> None:
        if event.layer == first_layer:
            forwards.append({})
        forwards[-1][event.layer] = frozenset(e for e in event.experts.flatten().tolist() if e >= 0)

    runtime.add_routing_listener(listen)
    traces = {}
    try:
        for source, texts in prompts.items():
            traces[source] = []
            for text in texts:
                forwards.clear()
                runtime.generate(text, max_new_tokens=max_tokens, min_new_tokens=max_tokens)
                traces[source].append(list(forwards))
    finally:
        runtime.remove_routing_listener(listen)
        runtime.close()
    return traces


def main(argv) -> int:
    args = parse_args(argv)
    load_before = _provenance.load_average()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip().lstrip("-").isdigit()]
    problems = [f"--replicas {args.replicas}: at least 2" if args.replicas < 2 else "",
                f"--cache-fraction {args.cache_fraction}: in (0, 1]" if not 0 < args.cache_fraction <= 1 else "",
                f"--concurrency {args.concurrency}: whole numbers, each at least 1"
                if not levels or len(levels) != len(args.concurrency.split(",")) or min(levels) < 1 else "",
                f"--per-source {args.per_source}: at least 1" if args.per_source < 1 else ""]
    if any(problems):
        print("error: " + "; ".join(p for p in problems if p), file=sys.stderr)
        return 2
    from bench.affinity import workload
    from extractor.store import ExpertStore
    from models.demo import ensure_demo_store

    store = args.store or str(ensure_demo_store())
    num_experts = ExpertStore.open(store).num_experts
    capacity = max(1, round(args.cache_fraction * num_experts))
    prompts, _ = workload(args.prompt_chars, args.per_source)
    wanted = [name for name in args.sources.split(",") if name]
    unknown = sorted(set(wanted) - set(prompts))
    if unknown or (wanted and len(wanted) < args.replicas):
        print(f"error: --sources {args.sources}: " + (f"unknown {', '.join(unknown)} (known: {', '.join(prompts)})"
              if unknown else f"fewer sources than --replicas {args.replicas}"), file=sys.stderr)
        return 2
    prompts = {name: texts for name, texts in prompts.items() if not wanted or name in wanted}
    traces = record_traces(store, prompts, args.max_tokens)
    rows, best_over = [], {}
    for level in levels:
        level_rows = simulate(traces, args.replicas, capacity, level)
        base = level_rows[0]["hit_rate"]
        best = max(level_rows[1:], key=lambda r: r["hit_rate"])
        best_over[level] = best["hit_rate"] / base
        print(f"\naffinity bound: {args.store or 'demo model'}, {args.replicas} replicas x per-layer LRU of {capacity} "
              f"of {num_experts} experts, {level} requests at a time, {sum(map(len, traces.values()))} requests "
              f"({args.per_source} per source: {', '.join(traces)}), {args.max_tokens} new tokens, greedy routing measured")
        for row in level_rows:
            print(f"  {row['placement']:<48} hit rate {row['hit_rate']:.1%}  ({row['hit_rate'] / base:.2f}x round-robin)")
        print(f"best placement by source / round-robin: {best_over[level]:.2f}x")
        rows += [dict(row, concurrency=level) for row in level_rows] if len(levels) > 1 else level_rows
    if args.json:  # one level: its figures as they always were; several: per level, keyed by it
        one = len(levels) == 1
        _provenance.write(args.json, "affinity-bound", argv, rows, load_before, capacity=capacity,
                          num_experts=num_experts, replicas=args.replicas,
                          concurrency=levels[0] if one else levels, per_source=args.per_source,
                          max_tokens=args.max_tokens,
                          best_over_round_robin=best_over[levels[0]] if one else {str(k): v for k, v in best_over.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
