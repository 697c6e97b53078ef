"""Prompt scoring: the logprob of every prompt token given the ones before it (OpenAI's
`echo` with `logprobs`, what lm-eval's loglikelihood and multiple-choice tasks read).

One plain forward of the whole prompt, no KV cache kept: the same computation as
transformers' `model(input_ids).logits` that lm-eval's `hf` model runs. Shapes: T prompt
tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from .logits import top_logprobs
from .sampling import StepResult


@torch.inference_mode()
def prompt_logprobs(model, prompt_ids: list[int], top_n: int, device) -> list[StepResult | None]:
    """One entry per prompt token; the first is None (nothing precedes it)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    logits = model(input_ids=ids, use_cache=False).logits[0].float().cpu()  # [T, V]
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # [T-1, V]: row t scores token t+1
    targets = ids[0, 1:].cpu()  # [T-1]
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()  # [T-1]
    entries: list[StepResult | None] = [None]
    for row, (token, logprob) in enumerate(zip(targets.tolist(), chosen)):
        entries.append(StepResult(token, logprob, tuple(top_logprobs(logprobs[row], top_n))))
    return entries
