"""A captured decode step is checked once against the eager step: a replay whose logits
differ (a model that read host state while it was captured) turns capture off, logged, and
the eager logits are used; a replay that agrees is marked verified. The check itself is
exercised here on CPU with the eager forward standing in for a replay."""

import logging

import torch

from models import Runtime, RuntimeConfig
from models.decoder import _CapturedStep


def decoder_with_prompt(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0))
    decoder = runtime.decoder(max_batch=1, max_len=64)
    decoder.prefill(0, [5, 6, 7])
    return runtime, decoder


def step_inputs():
    return torch.tensor([[9]]), torch.tensor([[3]])


def fake_step() -> _CapturedStep:
    return _CapturedStep(pieces=[], splits=[], input_ids=None, positions=None, logits=None, routing=None)


def test_a_replay_that_agrees_is_marked_verified(store_factory):
    runtime, decoder = decoder_with_prompt(store_factory)
    ids, positions = step_inputs()
    with torch.inference_mode():
        eager = decoder._forward(ids, decoder._arange[:1], positions, slice(0, 1), 64).clone()
        step = fake_step()
        got = decoder._verify(step, 1, 64, ids, positions, eager)
    assert step.verified and torch.equal(got, eager)
    runtime.close()


def test_a_replay_that_differs_turns_capture_off(store_factory, caplog):
    runtime, decoder = decoder_with_prompt(store_factory)
    ids, positions = step_inputs()
    events = []
    runtime.add_routing_listener(events.append)
    decoder._steps[(1, 64)] = step = fake_step()
    with torch.inference_mode():
        eager = decoder._forward(ids, decoder._arange[:1], positions, slice(0, 1), 64).clone()
        events.clear()
        with caplog.at_level(logging.WARNING, logger="cadre.decoder"):
            got = decoder._verify(step, 1, 64, ids, positions, eager + 1.0)
    assert torch.equal(got, eager) and not step.verified
    assert not decoder.use_graphs and not decoder._steps
    assert "differs from the eager step" in caplog.text
    assert events == []  # the recomputed step's routing was already reported by the replay
    runtime.close()
