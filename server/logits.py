"""What OpenAI's (and vLLM's) per-request sampling parameters do to one request's
next-token scores: a row [V] of logits, V the vocabulary.

Applied in vLLM's order: min_tokens bans, logit_bias, then the penalties, then a grammar's
mask (constrained decoding); temperature, top-k and top-p come after (transformers'
warpers, in sampling.py). Penalty formulas:
- repetition_penalty (transformers / CTRL): over every token of prompt and output so far,
  a positive logit is divided by the penalty, a negative one multiplied by it;
- frequency/presence (OpenAI): logit - frequency * count - presence * (count > 0), over
  output tokens only.
"""

from __future__ import annotations

import torch


def ban(row: torch.Tensor, token_ids: torch.Tensor) -> None:
    """row [V]; token_ids [N]: never chosen (min_tokens keeps a request from stopping early)."""
    row[token_ids] = float("-inf")


def only(row: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """row [V]; allowed [A] token ids: every other token banned (a grammar's next tokens)."""
    kept = torch.full_like(row, float("-inf"))  # [V]
    kept[allowed] = row[allowed]
    return kept


def add_bias(row: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor) -> None:
    """row [V]; token_ids [N], bias [N] (OpenAI's logit_bias, -100 bans, +100 forces)."""
    row[token_ids] += bias


def repetition_penalty(row: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """row [V]; seen [V] bool: tokens of the prompt and the output so far."""
    penalised = torch.where(row < 0, row * penalty, row / penalty)  # [V]
    return torch.where(seen, penalised, row)


def frequency_presence(row: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """row [V]; counts [V] float: how often each token occurs in the output so far."""
    return row - frequency * counts - presence * (counts > 0).to(row.dtype)


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of logprobs [V] as (token id, logprob), most likely first."""
    if n <= 0:
        return []
    values, ids = torch.topk(logprobs, min(n, logprobs.numel()))  # [n], [n]
    return list(zip(ids.tolist(), values.tolist()))
