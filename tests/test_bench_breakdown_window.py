"""bench breakdown --decode-only: the profiled window opens at the first token, so the prompt's
prefill (and its expert loads) stays out of the per-token figures. The windowing runs on the CPU
with a stand-in generate; the GPU figures themselves come from the lent machine."""

import torch

from bench.breakdown import measure

PREFILL_LOADS, STEP_LOADS = 50, 3


def fake_generate(counter):
    def generate(ids, tokens, on_prefilled=None):
        counter["loads"] += PREFILL_LOADS  # the prompt's prefill
        if on_prefilled is not None:
            on_prefilled(torch.zeros(1, 8))
        for _ in range(tokens - 1):  # the decode steps after the first token
            counter["loads"] += STEP_LOADS
            torch.ones(64, 64) @ torch.ones(64, 64)
        return ids
    return generate


def test_decode_only_counts_the_steps_after_the_first_token():
    counter = {"loads": 0}
    row = measure(fake_generate(counter), torch.zeros(1, 4, dtype=torch.long), 9, lambda: counter["loads"],
                  decode_only=True)
    assert row["loads_per_token"] == STEP_LOADS
    assert row["wall_us"] > 0


def test_the_whole_run_counts_the_prefill_too():
    counter = {"loads": 0}
    row = measure(fake_generate(counter), torch.zeros(1, 4, dtype=torch.long), 9, lambda: counter["loads"])
    assert row["loads_per_token"] == (PREFILL_LOADS + 8 * STEP_LOADS) / 9
