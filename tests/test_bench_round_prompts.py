"""bench decode times each round on prompts of its own: greedy decoding of the warm-up's
prompt would repeat the warm-up's routing exactly, and a capped cache would then report the
hits of a sequence it has just seen, which no server sees."""

import torch

from bench.decode import prompt_ids, round_prompts


def test_each_round_decodes_a_fresh_prompt_of_the_warm_up_shape_and_range():
    warm_up = prompt_ids(vocab_size=512, batch=2)
    rounds = round_prompts(warm_up, 3)
    assert len(rounds) == 3 and all(r.shape == warm_up.shape and r.dtype == warm_up.dtype for r in rounds)
    assert all(10 <= int(r.min()) and int(r.max()) <= int(warm_up.max()) for r in rounds)
    prompts = [warm_up, *rounds]
    assert all(not torch.equal(a, b) for i, a in enumerate(prompts) for b in prompts[i + 1:])
    # every system of a round, and the reference child processes, get the same prompts
    assert all(torch.equal(a, b) for a, b in zip(rounds, round_prompts(prompt_ids(512, 2), 3)))
