"""Routing, eviction and prefetch policies: exact is the default, the lossless ones
change no token, the lossy ones do what their counters say and never touch an absent expert."""

import pytest
import torch

from models import Runtime, RuntimeConfig
from router.eviction import EVICTION_POLICIES, SalienceEviction
from router.policy import POLICIES, CacheAwarePolicy, DynamicKPolicy, ExactPolicy, make_policy

KEPT = 8  # tiny stores below hold experts 0-7 of 16
NEW_TOKENS = 16


def prompt() -> torch.Tensor:
    return torch.randint(3, 120, (1, 8), generator=torch.Generator().manual_seed(5))


def run(store, policy=None, **config) -> tuple[Runtime, torch.Tensor, list]:
    runtime = Runtime.from_store(store, RuntimeConfig(**config), policy=policy)
    events = []
    runtime.add_routing_listener(events.append)
    tokens = runtime.generate(prompt(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return runtime, tokens, events


def test_default_routing_is_exact():
    assert RuntimeConfig().routing == "exact" and type(make_policy("exact")) is ExactPolicy
    assert {"exact", "cache-aware", "dynamic-k"} <= set(POLICIES)
    assert "salience" in EVICTION_POLICIES


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("make", [
    lambda: ExactPolicy(prefetch_layers=2, widen=2),
    lambda: CacheAwarePolicy(threshold=1.0, prefetch_layers=1),
    lambda: DynamicKPolicy(coverage=0.5),
], ids=["exact+prefetch", "cache-aware", "dynamic-k"])
def test_no_policy_selects_or_loads_an_absent_expert(family, make, store_factory):
    _, store = store_factory(family, experts=f"0-{KEPT - 1}")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5, eviction="salience"), policy=make())
    loaded = []
    runtime.cache.on_load = lambda key, tier, seconds: loaded.append(key)
    events = []
    runtime.add_routing_listener(events.append)
    runtime.generate(prompt(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    routed = torch.cat([event.experts.flatten() for event in events])
    assert loaded and all(expert < KEPT for _, expert in loaded)
    assert routed.max() < KEPT and routed.ge(0).any()


def test_prefetch_and_salience_eviction_change_no_token(store_factory):
    _, store = store_factory("qwen3_moe")
    _, expected, _ = run(store, cache_fraction=0.25)
    runtime, tokens, events = run(store, ExactPolicy(prefetch_layers=1, widen=4), cache_fraction=0.25,
                                  eviction="salience")
    assert torch.equal(tokens, expected)
    stats = runtime.cache.stats()
    assert stats.prefetch["issued"] > 0 and stats.prefetch["used"] > 0
    assert any("prefetched" in event.outcomes.values() for event in events)
    assert isinstance(runtime.cache.policy, SalienceEviction) and runtime.cache.policy.history.counts


def test_salience_eviction_evicts_the_expert_that_carried_least_weight():
    eviction = SalienceEviction(window=3)

    class Store:
        num_experts = 4

    class FakeRuntime:  # only what attach() reads
        store = Store()
        listeners = []

        def add_routing_listener(self, fn):
            self.listeners.append(fn)

    eviction.attach(FakeRuntime())
    eviction.history.observe(0, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0.9, 0.1], [0.8, 0.2]]))
    # LRU order 0, 1, 2, 3: expert 3 never routed -> first; among used ones, 1 carried least
    assert eviction.victim(iter([(0, 0), (0, 1), (0, 2), (0, 3)]), cache=None, incoming=(0, 5)) == (0, 1)  # window of 3
    assert eviction.victim(iter([(0, 0), (0, 3), (0, 1)]), cache=None, incoming=(0, 5)) == (0, 3)


def test_cache_aware_substitutes_resident_experts_and_counts_regret(store_factory):
    _, store = store_factory("qwen3_moe")
    exact, _, _ = run(store, cache_fraction=0.25)
    off, tokens_off, _ = run(store, CacheAwarePolicy(threshold=0.0), cache_fraction=0.25)
    on, _, events = run(store, CacheAwarePolicy(threshold=1.0), cache_fraction=0.25)
    assert off.policy.regret == 0 and torch.equal(tokens_off, run(store, cache_fraction=0.25)[1])
    assert on.policy.regret > 0 and on.policy.regret_mass > 0
    assert on.cache.stats().misses < exact.cache.stats().misses
    for event in events:  # still K distinct experts per token
        for row in event.experts.tolist():
            used = [e for e in row if e >= 0]
            assert len(used) == len(set(used)) == len(row)


def test_dynamic_k_runs_fewer_experts_and_full_coverage_is_exact(store_factory):
    _, store = store_factory("qwen3_moe")
    _, expected, _ = run(store)
    full, tokens, _ = run(store, DynamicKPolicy(coverage=1.0))
    assert torch.equal(tokens, expected) and full.policy.skipped == 0
    half, _, events = run(store, DynamicKPolicy(coverage=0.5))
    assert half.policy.skipped > 0 and half.policy.kept > 0
    used_per_token = torch.cat([(event.experts >= 0).sum(dim=-1) for event in events]).float()
    assert used_per_token.min() >= 1 and used_per_token.mean() < 4
    for event in events:  # dropped slots weigh nothing; kept weights still sum to 1 (renormalising family)
        torch.testing.assert_close(event.weights.sum(dim=-1), torch.ones(event.weights.shape[0]))
        assert torch.all(event.weights[event.experts < 0] == 0)
