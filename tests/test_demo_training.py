"""Training pieces of the demo model: the balancing loss, the schedule, the shared batches."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from models.demo.architecture import dense_config, moe_config, parameter_counts
from models.demo.train import Settings, balance_loss, learning_rate, training_batches


def test_balance_loss_is_one_when_uniform_and_grows_with_collapse():
    uniform = torch.zeros(64, 32)  # every expert equally likely
    assert torch.isclose(balance_loss((uniform,), top_k=4), torch.tensor(1.0))
    collapsed = torch.zeros(64, 32)
    collapsed[:, :4] = 10.0  # every token to experts 0-3
    assert balance_loss((collapsed,), top_k=4) > 7.0


def test_balance_loss_sees_each_layer_on_its_own():
    # Two layers that are each collapsed onto different experts: pooled counts look balanced,
    # per-layer balancing does not.
    a, b = torch.zeros(64, 8), torch.zeros(64, 8)
    a[:, :4], b[:, 4:] = 10.0, 10.0
    assert balance_loss((a, b), top_k=4) > 1.9


def test_schedule_warms_up_then_decays_to_min_lr():
    s = Settings(steps=1000, warmup_steps=100, lr=2e-3, min_lr=2e-4)
    assert learning_rate(0, s) == 2e-3 / 100
    assert learning_rate(99, s) == 2e-3
    assert abs(learning_rate(999, s) - 2e-4) < 1e-6
    assert all(learning_rate(i, s) >= learning_rate(i + 1, s) for i in range(100, 999))


def test_moe_and_dense_see_the_same_batches():
    ids = torch.arange(10_000)
    s = Settings(batch_size=3, seq_len=16, seed=7)
    first, second = training_batches(ids, s), training_batches(ids, s)
    for _ in range(3):
        a, b = next(first), next(second)
        assert torch.equal(a, b) and a.shape == (3, 16)
        assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, 15, dtype=torch.long))  # contiguous windows


def test_dense_baseline_matches_active_parameters():
    with torch.device("meta"):  # counts need shapes, not weights
        moe = parameter_counts(AutoModelForCausalLM.from_config(moe_config()))
        dense = parameter_counts(AutoModelForCausalLM.from_config(dense_config()))
    routers = 8 * 32 * 192  # the MoE's only extra active parameters
    assert moe["active"] - dense["active"] == routers
