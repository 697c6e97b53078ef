"""Group-limited routing (DeepSeek-V3, GLM, Kimi) masked to a sparse store: a group with one
present expert can still be chosen, so a token is routed to the experts the store holds, never
to none of them; with every expert present the choice is transformers' (the parity tests)."""

import torch

from router.exact import UNUSED, RoutingSpec, route

SPEC = RoutingSpec(kind="sigmoid_group_topk", top_k=4, num_experts=16, renormalize=True, n_group=4, topk_group=2,
                   routed_scaling_factor=2.5)


def absent_except(*present: int) -> torch.Tensor:
    absent = torch.ones(16, dtype=torch.bool)
    absent[list(present)] = False
    return absent


def test_one_expert_per_group_still_routes():
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    weights, indices = route(SPEC, logits, absent_except(1, 6), torch.zeros(16))  # groups 0 and 1
    for row_weights, row in zip(weights, indices):
        chosen = sorted(int(e) for e in row if e != UNUSED)
        assert chosen == [1, 6]  # both groups chosen (the only ones with an expert), nothing absent
        assert torch.isclose(row_weights.sum(), torch.tensor(SPEC.routed_scaling_factor))


def test_groups_with_two_present_experts_rank_as_before():
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    absent = absent_except(0, 1, 4, 5, 8, 9, 12, 13)  # two per group: the sums are the unmasked rule's
    weights, indices = route(SPEC, logits, absent, torch.zeros(16))
    scores = logits.sigmoid().masked_fill(absent, float("-inf")).view(8, 4, 4)
    best_groups = scores.topk(2, dim=-1)[0].sum(-1).topk(2, dim=-1)[1]  # [T,2]
    for row, groups in zip(indices, best_groups):
        assert {int(e) // 4 for e in row if e != UNUSED} <= set(groups.tolist())
