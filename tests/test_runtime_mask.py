"""A store holding experts 0-7 of 16 never runs expert >= 8 and equals transformers
with those experts excluded from routing (-inf before softmax / top-k)."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from tiny_models import FIRST_SIX as FAMILIES

KEPT = 8


def reference_with_experts_excluded(checkpoint, family, monkeypatch):
    """transformers' own model and routing code, with experts >= KEPT excluded.

    Softmax families: their router logits are set to -inf (patched into the
    F.linear the gate calls). DeepSeek-V3 chooses by sigmoid(logit) + bias, where a
    -inf logit still scores `bias`; there the exclusion is a -inf correction bias.
    """
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if family == "deepseek_v3":
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias[KEPT:] = float("-inf")
        return model
    gate_weights = {id(layer.mlp.gate.weight) for layer in model.model.layers if hasattr(layer.mlp, "gate")}
    module = importlib.import_module(type(model).__module__)
    real_linear = module.F.linear

    class MaskedF:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def linear(x, weight, bias=None):
            out = real_linear(x, weight, bias)
            if id(weight) in gate_weights:
                out = out.clone()
                out[..., KEPT:] = float("-inf")
            return out

    monkeypatch.setattr(module, "F", MaskedF())
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_absent_experts_never_run_and_outputs_match(family, store_factory, monkeypatch):
    checkpoint, store = store_factory(family, experts=f"0-{KEPT - 1}")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    loaded = []
    runtime.cache.on_load = lambda key, tier, seconds: loaded.append(key)
    routed = []
    runtime.add_routing_listener(lambda event: routed.append(event.experts))
    ids = torch.randint(3, 120, (1, 10), generator=torch.Generator().manual_seed(3))
    got = runtime.generate(ids, max_new_tokens=24, min_new_tokens=24)

    assert loaded and all(expert < KEPT for _, expert in loaded)
    assert all(int(experts.max()) < KEPT for experts in routed)

    reference = reference_with_experts_excluded(checkpoint, family, monkeypatch)
    expected = reference.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(runtime.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    runtime.close()


def test_layer_with_fewer_than_k_experts_uses_all_it_has(store_factory):
    _, store = store_factory("qwen3_moe", experts="0-1")  # top-4 routing, 2 experts present
    runtime = Runtime.from_store(store)
    routed = []
    runtime.add_routing_listener(lambda event: routed.append(event))
    runtime.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    for event in routed:
        used = event.experts[event.experts >= 0]
        assert set(used.tolist()) <= {0, 1}
        assert (event.experts >= 0).sum(dim=1).eq(2).all()  # both present experts, every token
        assert torch.allclose(event.weights.sum(dim=1), torch.ones(event.weights.shape[0]), atol=1e-5)
    runtime.close()
