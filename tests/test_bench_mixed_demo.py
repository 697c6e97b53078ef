"""bench mixed-demo's measures and its data rule: the routing separation is zero for sources that
route alike and grows when they route apart, and no module bench affinity prompts or calibrates
with is trained on."""

import torch
from transformers import AutoModelForCausalLM

from bench import affinity, mixed_demo
from models.demo import CHECKPOINT_DIR


def test_sources_that_route_alike_are_zero_bits_apart():
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    batch = torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert abs(mixed_demo.separation(model, {"a": batch, "b": batch.clone()})) < 1e-6
    other = torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(1))
    assert mixed_demo.separation(model, {"a": batch, "b": other}) > 0


def test_no_benchmark_text_is_trained_on():
    held = set(affinity.CODE_MODULES + affinity.CODE_CALIBRATION + affinity.PROSE_MODULES
               + affinity.PROSE_CALIBRATION)
    assert not held & set(mixed_demo.TRAIN_CODE + mixed_demo.TRAIN_PROSE)


def test_finer_experts_keep_the_demos_parameters_and_bad_counts_are_refused():
    import pytest

    base, fine = mixed_demo.scratch_config(None), mixed_demo.scratch_config(64)
    assert fine.num_experts == 64 and fine.num_experts_per_tok == base.num_experts_per_tok
    assert fine.num_experts * fine.moe_intermediate_size == base.num_experts * base.moe_intermediate_size
    with pytest.raises(SystemExit, match="--experts 3 must divide"):
        mixed_demo.scratch_config(3)
    assert mixed_demo.main(["--out", "/tmp/unused", "--experts", "64"]) == 2  # the demo's own weights have 32
