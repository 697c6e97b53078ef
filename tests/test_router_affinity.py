"""router.affinity: the replica whose cache holds what a prompt routes to wins, unless its
queue is too long; no signal or no prompt falls back to the shortest queue."""

from router.affinity import Candidate, ReplicaSummary, expected_hit_rate, place, summarize

LAYERS = [0, 1]


def summary(experts: set[int]) -> ReplicaSummary:
    return ReplicaSummary({l: frozenset(experts) for l in LAYERS}, {l: frozenset(experts) for l in LAYERS})


def prediction(experts: set[int], num_experts: int = 8) -> list[list[float]]:
    row = [1.0 / len(experts) if e in experts else 0.0 for e in range(num_experts)]
    return [row, row]


WARM_A, WARM_B = summary({0, 1}), summary({4, 5})


def test_expected_hit_rate_is_the_predicted_mass_on_warm_experts():
    assert expected_hit_rate(prediction({0, 1}), LAYERS, WARM_A) == 1.0
    assert expected_hit_rate(prediction({0, 4}), LAYERS, WARM_A) == 0.5
    half = ReplicaSummary({l: frozenset({0, 1}) for l in LAYERS}, {l: frozenset() for l in LAYERS})
    assert expected_hit_rate(prediction({0, 1}), LAYERS, half) == 0.5  # resident but not hot: half warm
    assert expected_hit_rate(prediction({0, 1}), LAYERS, None) == 0.0


def test_the_warm_replica_wins_over_a_shorter_queue_within_the_imbalance():
    candidates = [Candidate("a", 3, WARM_A), Candidate("b", 0, WARM_B)]
    placed = place(prediction({4, 5}), LAYERS, candidates, imbalance=4)
    assert placed.outcome == "affinity" and placed.ranked == ["b", "a"]
    placed = place(prediction({0, 1}), LAYERS, candidates, imbalance=4)
    assert placed.outcome == "affinity" and placed.ranked == ["a", "b"]


def test_a_too_long_queue_falls_back_to_the_shortest():
    candidates = [Candidate("a", 9, WARM_A), Candidate("b", 2, WARM_B)]
    placed = place(prediction({0, 1}), LAYERS, candidates, imbalance=4)
    assert placed.outcome == "fallback" and placed.ranked == ["b", "a"]


def test_no_signal_or_no_prompt_takes_the_shortest_queue():
    cold = [Candidate("a", 2, None), Candidate("b", 1, None)]
    assert place(prediction({0, 1}), LAYERS, cold).outcome == "balanced"
    assert place(prediction({0, 1}), LAYERS, cold).ranked == ["b", "a"]
    assert place(None, LAYERS, cold) .outcome == "no_prediction"
    assert place(prediction({0}), LAYERS, [Candidate("a", 0, WARM_A)]).outcome == "balanced"


def test_summary_ranks_hot_experts_by_usage_and_survives_routing_stats():
    made = summarize([(0, 3), (1, 2)], [[0.0, 5.0, 1.0, 9.0], [2.0, 0.0, 0.0, 0.0]], [0, 1], num_slots=4)
    assert made.resident == {0: frozenset({3}), 1: frozenset({2})}
    assert made.hot == {0: frozenset({3, 1}), 1: frozenset({0})}  # 2 slots per layer; unused experts are not hot
    assert ReplicaSummary.from_stats(made.to_stats()) == made
    assert ReplicaSummary.from_stats({}) is None
