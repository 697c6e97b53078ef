"""Each SNARC signal on hand-built router outputs, against values worked out by hand."""

import math

import torch

from router import signals


def test_surprise_is_token_surprisal_in_nats():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))  # [T=2,V=3]
    got = signals.surprisal(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(got, torch.tensor([math.log(2), -math.log(0.8)]))


def test_router_shift_is_zero_for_usual_routing_and_kl_otherwise():
    baseline = torch.tensor([0.25, 0.25, 0.25, 0.25])
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    got = signals.router_shift(probs, baseline)
    torch.testing.assert_close(got, torch.tensor([0.0, math.log(4)]), atol=1e-6, rtol=0)


def test_novelty_is_one_for_unused_experts_and_falls_with_use():
    got = signals.novelty(torch.tensor([0.0, 1.0, 3.0]))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.5, 0.25]))


def test_arousal_is_one_for_a_certain_router_and_zero_for_a_uniform_one():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    got = signals.arousal(probs)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(signals.top1_margin(probs), torch.tensor([1.0, 0.0, 0.0]))


def test_reward_sums_the_weight_each_expert_carried_and_skips_unused_slots():
    indices = torch.tensor([[0, 2], [2, -1]])  # [T=2,K=2]
    weights = torch.tensor([[0.7, 0.3], [0.9, 0.5]])
    got = signals.reward(weights, indices, num_experts=4)
    torch.testing.assert_close(got, torch.tensor([0.7, 0.0, 1.2, 0.0]))


def test_conflict_margin_to_the_best_resident_alternative():
    probs = torch.tensor([[0.40, 0.30, 0.20, 0.10]])  # [T=1,E=4]
    indices = torch.tensor([[0, 1]])  # top-2 chose 0 and 1
    resident = torch.tensor([False, True, True, True])  # expert 0 would have to be loaded
    margin, alternative = signals.conflict(probs, indices, resident)
    # slot 0: 0.40 - best resident not already chosen (expert 2, 0.20); slot 1 is resident
    torch.testing.assert_close(margin, torch.tensor([[0.20, float("inf")]]))
    assert alternative.tolist() == [[2, -1]]


def test_conflict_gives_two_missing_slots_two_different_alternatives():
    probs = torch.tensor([[0.40, 0.30, 0.20, 0.10]])
    indices = torch.tensor([[0, 1]])
    resident = torch.tensor([False, False, True, True])
    margin, alternative = signals.conflict(probs, indices, resident)
    assert alternative.tolist() == [[2, 3]]
    torch.testing.assert_close(margin, torch.tensor([[0.20, 0.20]]))


def test_usage_history_decays_counts_and_mass():
    history = signals.UsageHistory(num_experts=3, decay=0.5)
    history.observe(0, torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))
    history.observe(0, torch.tensor([[0, -1]]), torch.tensor([[1.0, 0.0]]))
    assert abs(history.novelty(0, 0) - 1 / (1 + 1.5)) < 1e-6  # c = 0.5 * 1 + 1
    assert history.novelty(0, 2) == 1.0 and history.novelty(5, 0) == 1.0
    assert abs(history.reward(0, 1) - 0.2) < 1e-6  # 0.5 * 0.4
