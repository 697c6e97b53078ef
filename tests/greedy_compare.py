"""Greedy tokens compared the way vLLM's tests compare them (check_logprobs_close): equal, or,
from the first position where they part, the two choices were a tie to float tolerance by the
reference's own logits. For compiled paths only: inductor rounds fused ops once, which can
flip a near-tie of a tiny random model; a real error makes a choice the reference scores
clearly lower, and still fails. Eager paths ask for identical tokens."""

import torch

# A tie to the reference's own precision: float32 logits, or a few bfloat16/float16 ulps.
TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def assert_greedy_matches(reference, got: torch.Tensor, want: torch.Tensor, prompt_len: int) -> None:
    """got/want [B,T] greedy sequences from the same prompts; reference: the transformers model."""
    assert got.shape == want.shape, (got.shape, want.shape)
    got = got.to(want.device)  # the decoder's tokens may live on the GPU, the reference's on the host
    if torch.equal(got, want):
        return
    with torch.no_grad():
        logits = reference(want).logits  # [B,T,V]: position p predicts token p+1
    tolerance = TIE_TOLERANCE.get(logits.dtype, 1e-3)
    logits = logits.float()
    for row in range(got.shape[0]):
        differ = (got[row, prompt_len:] != want[row, prompt_len:]).nonzero()
        if not len(differ):
            continue
        position = prompt_len + int(differ[0])
        scores = logits[row, position - 1]
        gap = float(scores[want[row, position]] - scores[got[row, position]])
        assert gap <= tolerance, (
            f"row {row} parts at position {position}: token {int(got[row, position])} where the reference "
            f"chose {int(want[row, position])}, {gap:.3g} below it in the reference's logits (not a tie)")
