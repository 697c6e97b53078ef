"""bench affinity-bound replays measured routing through simulated replicas: placing requests by
source beats round-robin exactly when the sources use different experts."""

from bench.affinity_bound import LayerLRU, placements, replay, simulate


def trace(experts: set[int], steps: int = 6) -> list[dict[int, frozenset[int]]]:
    return [{0: frozenset(experts), 1: frozenset(experts)} for _ in range(steps)]


def test_sources_with_their_own_experts_gain_from_placement_by_source():
    traces = {"a": [trace({0, 1})] * 4, "b": [trace({2, 3})] * 4, "c": [trace({4, 5})] * 4, "d": [trace({6, 7})] * 4}
    rows = {r["placement"]: r for r in simulate(traces, replicas=2, capacity=4, concurrency=1)}
    best = max((r for name, r in rows.items() if name.startswith("by source")), key=lambda r: r["hit_rate"])
    # by source, a replica's 4 slots hold both of its sources' experts: only cold misses
    assert best["hit_rate"] > 0.9 and rows["round-robin"]["hit_rate"] < 0.9
    assert sorted(best["requests"]) == [8, 8]


def test_sources_that_route_alike_gain_nothing():
    same = {s: [trace({0, 1, 2})] * 4 for s in "abcd"}
    rows = simulate(same, replicas=2, capacity=4, concurrency=2)
    rates = {round(r["hit_rate"], 6) for r in rows}
    assert len(rates) == 1


def test_a_batch_step_counts_distinct_experts_and_evicts_least_recent():
    cache = LayerLRU(capacity=2)
    cache.step({0: {1, 2}})
    cache.step({0: {2, 3}})  # 2 hits; 1 is evicted
    cache.step({0: {1}})
    assert (cache.hits, cache.queries) == (1, 5)
    served = replay([trace({1}, steps=2), trace({1}, steps=3)], capacity=2, concurrency=2)
    assert served.queries == 2 * 3  # one distinct expert per layer per batch step, 3 steps


def test_requests_arrive_interleaved_and_every_split_is_tried():
    traces = {s: [trace({i})] * 2 for i, s in enumerate("abc")}
    placed = placements(traces, replicas=2)
    assert len(placed) == 1 + 3  # round-robin, then {a|bc, b|ac, c|ab}
    assert all(sum(len(r) for r in per) == 6 for per in placed.values())


def test_bad_options_exit_2_naming_the_option(capsys):
    from bench.affinity_bound import main

    assert main(["--replicas", "1"]) == 2
    assert main(["--cache-fraction", "0"]) == 2
    assert main(["--concurrency", "4,0"]) == 2
    err = capsys.readouterr().err
    assert "--replicas 1" in err and "--cache-fraction 0.0" in err and "--concurrency 4,0" in err


def test_unknown_or_too_few_sources_exit_2_naming_them(capsys):
    from bench.affinity_bound import main

    assert main(["--sources", "macbeth,poetry"]) == 2
    assert main(["--sources", "code"]) == 2  # one source cannot be split over two replicas
    err = capsys.readouterr().err
    assert "unknown poetry" in err and "fewer sources than --replicas 2" in err
