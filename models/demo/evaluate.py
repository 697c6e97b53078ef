"""Held-out measurements shared by training, the tests and the benchmarks.

Text is cut into non-overlapping windows of the training length; every position but a
window's first is predicted, and the same positions are scored for every model (MoE, dense
and unigram), so their perplexities compare directly.

Legend for shape comments: W windows, S window length, T tokens, L MoE layers, E experts,
K experts per token, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[T] token ids -> [W, S] non-overlapping windows (the ragged tail is dropped)."""
    num_windows = ids.numel() // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    assert num_windows > 0, f"{ids.numel()} tokens make no window of {seq_len}"
    return ids[: num_windows * seq_len].view(num_windows, seq_len)  # [W, S]


@dataclass
class HeldoutPass:
    nll: float  # mean next-token negative log-likelihood, nats
    topk: torch.Tensor | None  # [L, T, K] experts chosen per MoE layer, tokens in text order


@torch.no_grad()
def heldout_pass(model, windows: torch.Tensor, batch_size: int = 8, with_routing: bool = False) -> HeldoutPass:
    """Score positions 1..S-1 of every window; optionally record the router's top-k for every token.

    Cross-entropy of the logits alone: a MoE's load-balancing term is not part of it.
    Top-k of the router logits is top-k of its softmax, so the routing is the model's own.
    """
    device = next(model.parameters()).device
    top_k = getattr(model.config, "num_experts_per_tok", None)
    total, count, routed = 0.0, 0, []
    for batch in windows.split(batch_size):
        batch = batch.to(device)  # [B, S]
        out = model(input_ids=batch, use_cache=False, output_router_logits=with_routing)
        logits = out.logits  # [B, S, V]
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
        if with_routing:
            layers = [layer_logits.topk(top_k, dim=-1).indices for layer_logits in out.router_logits]  # L x [B*S, K]
            routed.append(torch.stack(layers).cpu())  # [L, B*S, K]
    return HeldoutPass(nll=total / count, topk=torch.cat(routed, dim=1) if with_routing else None)


def mean_nll(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    return heldout_pass(model, windows, batch_size).nll


def unigram_nll(train_ids: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """The same positions scored by add-one-smoothed token frequencies of the training split."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # [V]
    log_probs = counts.log() - counts.sum().log()  # [V]
    return -log_probs[windows[:, 1:].flatten()].mean().item()


def perplexity(nll: float) -> float:
    return math.exp(nll)


def route_topk(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The experts the router picks for every token: [L, T, K], tokens in text order."""
    return heldout_pass(model, windows, batch_size, with_routing=True).topk


def expert_load(topk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, T, K] routing -> [L, E] share of each layer's top-k slots that went to each expert."""
    counts = torch.stack([torch.bincount(layer.flatten(), minlength=num_experts) for layer in topk])  # [L, E]
    return counts.double() / counts.sum(dim=1, keepdim=True)


SAMPLE_PROMPTS = (
    "ROMEO.\nBut soft,",
    "MACBETH.\n",
    "KING.\nMy lords,",
    "To be, or not to be,",
)


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 48) -> list[dict]:
    """Greedy continuations with transformers' generate(): [{"prompt", "completion"}]."""
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, P]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)  # [1, P+N]
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1]:])})
    return samples
