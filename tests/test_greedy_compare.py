"""The tie-aware greedy comparison accepts equal sequences and a parting at a tie, and
rejects a parting where the reference clearly preferred its own token."""

import pytest
import torch

from greedy_compare import assert_greedy_matches


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token scores after each position are given."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores  # [T,V]

    def forward(self, ids):
        return type("Out", (), {"logits": self.scores[: ids.shape[1]].unsqueeze(0)})()


def scores(tie: float) -> torch.Tensor:
    table = torch.zeros(4, 5)
    table[1, 2], table[1, 3] = 1.0, 1.0 - tie  # after position 1 the reference prefers 2, then 3
    return table


def test_equal_sequences_pass():
    seq = torch.tensor([[0, 1, 2, 4]])
    assert_greedy_matches(FixedLogits(scores(0.5)), seq, seq.clone(), prompt_len=2)


def test_parting_at_a_tie_passes():
    want, got = torch.tensor([[0, 1, 2, 4]]), torch.tensor([[0, 1, 3, 0]])
    assert_greedy_matches(FixedLogits(scores(1e-5)), got, want, prompt_len=2)


def test_parting_where_the_reference_was_sure_fails():
    want, got = torch.tensor([[0, 1, 2, 4]]), torch.tensor([[0, 1, 3, 0]])
    with pytest.raises(AssertionError, match="not a tie"):
        assert_greedy_matches(FixedLogits(scores(0.5)), got, want, prompt_len=2)
