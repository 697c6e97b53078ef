"""bench locality's measures on routings whose answers are known by hand."""

from __future__ import annotations

import torch

from bench.locality import consecutive_overlap, lru_hit_rate, static_hit_rate, uniform_random_topk


def test_overlap_counts_experts_shared_with_the_previous_token():
    topk = torch.tensor([[0, 1], [1, 2], [3, 4], [3, 4]])
    assert consecutive_overlap(topk) == (1 / 2 + 0 / 2 + 2 / 2) / 3


def test_lru_hits_evicts_least_recent_and_counts_cold_misses():
    # capacity 2, one expert per token: 0 1 0 2 1 -> miss miss hit miss(evicts 1) miss
    topk = torch.tensor([[0], [1], [0], [2], [1]])
    assert lru_hit_rate(topk, capacity=2) == 1 / 5
    # a token's own experts do not hit each other: [0, 1] then [0, 1] -> 2 misses, 2 hits
    assert lru_hit_rate(torch.tensor([[0, 1], [0, 1]]), capacity=2) == 2 / 4


def test_static_cache_holds_the_most_used_experts():
    topk = torch.tensor([[0], [0], [0], [1], [2]])
    assert static_hit_rate(topk, num_experts=4, capacity=1) == 3 / 5


def test_uniform_random_routing_matches_the_analytic_rates():
    topk = uniform_random_topk(20000, num_experts=32, top_k=4, seed=0)
    assert topk.shape == (20000, 4) and all(len(set(row)) == 4 for row in topk[:100].tolist())
    assert abs(consecutive_overlap(topk) - 4 / 32) < 0.01
    assert abs(lru_hit_rate(topk, 16) - 16 / 32) < 0.01
