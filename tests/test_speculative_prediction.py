"""Speculative prefetch predicts a deeper layer's experts by applying its gate to this layer's
input: the experts its top-k picks over the batch's tokens, heaviest summed probability first,
none that no token picks. The prediction reaches the host in one transfer (on a GPU it runs at
every MoE layer of a step: a read per expert once cost more than the loads it started)."""

import torch

from models import Runtime, RuntimeConfig
from router.policy import ExactPolicy


def reference(policy, layer, hidden):
    """The same prediction, expert by expert in Python."""
    gate = policy._gates[layer]
    logits = hidden.reshape(-1, gate.weight.shape[-1]).to(gate.weight.dtype) @ gate.weight.T
    probs = torch.softmax(logits.float(), dim=-1)
    mass = {}
    for row in probs:
        values, experts = row.topk(policy.spec.top_k)
        for value, expert in zip(values.tolist(), experts.tolist()):
            mass[expert] = mass.get(expert, 0.0) + value
    return sorted(mass, key=lambda e: -mass[e])


def test_the_prediction_ranks_the_picked_experts_by_their_summed_probability(store_factory):
    _, store = store_factory("qwen3_moe")
    policy = ExactPolicy(prefetch_layers=1)
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5), policy=policy)
    try:
        layer = runtime.store.moe_layers[-1]
        hidden = torch.randn(3, 1, runtime.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        predicted = policy.predict(layer, hidden)
        assert all(key[0] == layer for key in predicted)
        assert [expert for _, expert in predicted] == reference(policy, layer, hidden)
        assert len(predicted) <= 3 * policy.spec.top_k
    finally:
        runtime.close()


def test_the_prediction_inside_a_captured_step_picks_what_predict_picks(store_factory):
    """predict_ahead (device work a captured step computes beside the routing, read with it in one
    synchronisation) picks each deeper layer's top-k: for one token, predict()'s experts in its order."""
    from models.decoder import _Split

    _, store = store_factory("qwen3_moe")
    policy = ExactPolicy(prefetch_layers=2)
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5), policy=policy)
    try:
        first = runtime.store.moe_layers[0]
        hidden = torch.randn(1, runtime.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        deeper, columns = policy.predict_ahead(first, hidden)
        assert deeper == policy._next[first] and len(deeper) == 2
        top_k = policy.spec.top_k
        assert columns.shape == (1, 2 * top_k)
        index = torch.tensor([[5, 2] + [-1] * (top_k - 2)])  # this layer's own choice, -1 unused
        split = _Split(layer=None, index=index, hidden=hidden, ahead=deeper, read=torch.cat([index, columns], dim=-1))
        needed, predicted = split.routing()
        assert needed == [2, 5]
        assert [layer for layer, _ in predicted] == [deeper[0]] * top_k + [deeper[1]] * top_k  # nearest first
        for layer in deeper:
            want = [expert for _, expert in policy.predict(layer, hidden)]
            assert [expert for key_layer, expert in predicted if key_layer == layer] == want
        assert policy.predict_ahead(runtime.store.moe_layers[-1], hidden) is None  # nothing deeper
    finally:
        runtime.close()
