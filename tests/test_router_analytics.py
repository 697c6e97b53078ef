"""Routing analytics on hand-built traces, and a trace recorded from a real runtime."""

import math

import torch

from models import Runtime, RuntimeConfig
from router import analytics


def test_purity_is_one_for_an_expert_that_sees_one_token_and_zero_for_an_even_mix():
    token_ids = torch.tensor([5, 5, 6, 7])
    indices = torch.tensor([[0, 1], [0, 1], [2, 1], [3, 1]])  # expert 0 sees token 5 only; 1 sees 5,5,6,7
    purity = analytics.token_purity(indices, token_ids, num_experts=5)
    assert purity[0] == 1.0
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert abs(purity[1] - (1 - h / math.log(3))) < 1e-9
    assert torch.isnan(purity[4])


def test_utilisation_entropy_and_pathways():
    layer0 = torch.tensor([[0, 1], [0, 2], [3, -1]])
    layer1 = torch.tensor([[4, 0], [4, 1], [4, 2]])
    assert analytics.utilisation(layer0, present=8) == 4 / 8
    assert abs(analytics.routing_entropy(torch.tensor([[0], [1], [2], [3]]), 4) - math.log(4)) < 1e-9
    assert analytics.routing_entropy(torch.tensor([[2], [2]]), 4) == 0.0
    assert analytics.pathways([layer0, layer1]) == [(0, 4), (0, 4), (3, 4)]
    assert analytics.distinct_pathways([layer0, layer1]) == 2


def test_trace_recorded_from_a_runtime(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig())
    trace = analytics.RoutingTrace()
    runtime.add_routing_listener(trace)
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        runtime.model(input_ids=ids, use_cache=False)
    trace.add_tokens(ids)
    summary = trace.summary(runtime.store.num_experts)
    assert sorted(summary["entropy"]) == runtime.store.moe_layers
    assert all(0 < u <= 1 for u in summary["utilisation"].values())
    assert 1 <= summary["distinct_pathways"] <= 24
    for layer, rows in trace.per_layer().items():  # slot 0 is each token's heaviest expert
        assert rows.shape == (24, runtime.store.top_k)
    for purity in summary["purity"].values():
        seen = purity[~purity.isnan()]
        assert seen.numel() > 0 and bool(((seen >= 0) & (seen <= 1)).all())
