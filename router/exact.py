"""Exact routing: each family's own top-k, masked to the experts the store holds.

Legend for shape comments: T tokens, E experts, H hidden, K top-k.

Absent experts are excluded with -inf *before* softmax / top-k (multiplying logits by
a 0/1 mask, as an early research note did, leaves negative logits at 0 and so selects
exactly the experts it meant to exclude). Where a layer holds fewer than K experts,
the surplus slots get index -1 and weight 0: the experts module skips them, so an
absent expert is never run.

With every expert present the functions below perform the same floating-point
operations, in the same order and dtypes, as transformers' routers, so the chosen
experts and weights are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNUSED = -1  # index of a top-k slot that selects nothing
SIGMOID_KINDS = ("sigmoid_group_topk", "sigmoid_topk", "sigmoid_bias_topk", "topk_sigmoid",
                 "sigmoid_sorted_topk", "score_bias_topk")  # the rest softmax their logits (DeepSeek-V4's
# positive scores, sqrt(softplus) by default, are close enough to a sigmoid's for the non-exact policies)


@dataclass(frozen=True)
class RoutingSpec:
    """What a family's router does, read from its table row and config.json."""

    kind: str  # one of extractor.families.ROUTING_KINDS
    top_k: int
    num_experts: int
    renormalize: bool
    weights_in_logits_dtype: bool = True  # Mixtral keeps its weights in float32
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # DeepSeek-V2: "greedy" | "group_limited_greedy"
    weights_in_hidden_dtype: bool = False  # Granite: weights cast to the hidden states' dtype
    jitter_eps: float = 0.0  # PhiMoE's router_jitter_noise (sparsemixer's threshold, used at inference too)
    norm_min: float = 1e-12  # ERNIE 4.5's moe_norm_min: the renormalisation divides by max(sum, norm_min)
    logit_softcap: float = 0.0  # Laguna's moe_router_logit_softcapping: logits = tanh(l / cap) * cap (0: off)
    group_fill: float = float("-inf")  # what experts outside the chosen groups score (A.X-K2: 0.0)
    sorted_topk: bool = False  # group-limited top-k sorted (Beam) rather than not (DeepSeek-V3)
    renorm_epsilon: float = 0.0  # added to the renormalising sum by sigmoid top-k routers (AFMoE: 1e-20)
    logits: str = ""  # "" (as the kind computes them) | "float32_out" (Kolibri: float32, its own CUDA GEMM)
    score_fn: str = "sigmoid"  # score_bias_topk: the config's scoring_func, one of transformers' ACT2FN


def route(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
          correction_bias: torch.Tensor | None = None,
          hidden_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,K], indices [T,K]) for router logits [T,E]; absent: bool [E] or None.

    correction_bias: DeepSeek-V3's / GLM's / ERNIE's e_score_correction_bias, LFM2's expert_bias."""
    if spec.kind == "softmax_topk":
        return softmax_topk(spec, logits, absent, hidden_dtype)
    if spec.kind == "sigmoid_group_topk":
        return sigmoid_group_topk(spec, logits, absent, correction_bias)
    if spec.kind == "softmax_group_topk":
        return softmax_group_topk(spec, logits, absent)
    if spec.kind == "topk_softmax":
        return topk_softmax(spec, logits, absent, hidden_dtype)
    if spec.kind == "sigmoid_topk":
        return sigmoid_topk(spec, logits, absent, correction_bias)
    if spec.kind == "sparsemixer":
        return sparsemixer_top2(spec, logits, absent)
    if spec.kind == "softmax_bias_topk":
        return softmax_bias_topk(spec, logits, absent, correction_bias, hidden_dtype)
    if spec.kind == "sigmoid_bias_topk":
        return sigmoid_bias_topk(spec, logits, absent, correction_bias)
    if spec.kind == "topk_sigmoid":
        return topk_sigmoid(spec, logits, absent, hidden_dtype, correction_bias)
    if spec.kind == "sigmoid_sorted_topk":
        return sigmoid_sorted_topk(spec, logits, absent, correction_bias, hidden_dtype)
    if spec.kind == "score_bias_topk":
        return score_bias_topk(spec, logits, absent, correction_bias)
    raise ValueError(f"unknown routing kind {spec.kind!r}")


def softmax_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                 hidden_dtype: torch.dtype | None = None):
    """Qwen, OLMoE, Mixtral and most: softmax, top-k, renormalised per the row; weights in the
    logits' dtype (Mixtral, MiniMax: float32; Lara-Mini: float32 logits, weights in the hidden dtype)."""
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))  # [T,E]
    probs = F.softmax(logits, dtype=torch.float, dim=-1)  # [T,E] float32
    weights, indices = torch.topk(probs, spec.top_k, dim=-1)  # [T,K]
    if spec.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    if spec.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    elif spec.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return _drop_absent(weights, indices, absent)


def sigmoid_group_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                       correction_bias: torch.Tensor | None):
    """DeepSeek-V3: sigmoid scores, bias-corrected choice within the best groups, scaled weights.
    Beam sorts its top-ks; A.X-K2 scores the experts of the other groups 0.0 instead of -inf
    (so one with a negative bias-corrected score can lose to them).

    Sigmoid is not shift-invariant, so masking the *logits* would leave an absent
    expert with score 0 + bias; the mask is applied to the choice scores instead.
    """
    scores = logits.sigmoid()  # [T,E] float32 (logits are computed in float32)
    choice = scores + correction_bias if correction_bias is not None else scores
    if absent is not None:
        choice = choice.masked_fill(absent, float("-inf"))
    per_group = spec.num_experts // spec.n_group
    top2 = choice.view(-1, spec.n_group, per_group).topk(2, dim=-1)[0]  # [T,G,2]
    if absent is not None:
        # a group holding one present expert scores it alone, one holding none stays at -inf
        # (summed as they are, a group of one would score -inf too, and a store with at most
        # one expert per group would route every token to no expert at all)
        empty = absent.view(1, spec.n_group, per_group).all(dim=-1, keepdim=True)  # [1,G,1]
        top2 = top2.masked_fill(top2 == float("-inf"), 0.0).masked_fill(empty, float("-inf"))  # no host sync
    group_scores = top2.sum(dim=-1)  # [T,G]
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=spec.sorted_topk)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, per_group).reshape(-1, spec.num_experts)
    choice = choice.masked_fill(~score_mask.bool(), spec.group_fill)  # [T,E]
    if absent is not None and spec.group_fill != float("-inf"):
        choice = choice.masked_fill(absent, float("-inf"))  # A.X-K2's 0.0 must not revive an absent expert
    indices = torch.topk(choice, k=spec.top_k, dim=-1, sorted=spec.sorted_topk)[1]  # [T,K]
    weights = scores.gather(1, indices)
    if absent is not None:
        weights = weights.masked_fill(absent[indices], 0.0)
    if spec.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    weights = weights * spec.routed_scaling_factor
    return _drop_absent(weights, indices, absent)


def softmax_group_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None):
    """DeepSeek-V2: softmax, top-k (greedy) or top-k within the best groups by their max,
    times the routed scaling factor; no renormalisation. Logits are float32."""
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))
    scores = logits.softmax(dim=-1, dtype=torch.float32)  # [T,E]
    if spec.topk_method == "group_limited_greedy":
        per_group = spec.num_experts // spec.n_group
        group_scores = scores.view(-1, spec.n_group, per_group).max(dim=-1).values  # [T,G]
        group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, per_group).reshape(-1, spec.num_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, indices = torch.topk(scores, k=spec.top_k, dim=-1, sorted=False)  # [T,K]
    return _drop_absent(weights * spec.routed_scaling_factor, indices, absent)


def topk_softmax(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                 hidden_dtype: torch.dtype | None):
    """gpt-oss, Granite: top-k of the logits (router bias included), softmax over those k.
    Granite's logits are float32 and its weights come back in the hidden states' dtype."""
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))  # [T,E]
    top, indices = torch.topk(logits, spec.top_k, dim=-1)  # [T,K]
    weights = torch.softmax(top, dim=-1, dtype=top.dtype)
    if spec.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return _drop_absent(weights, indices, absent)


def sigmoid_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                 expert_bias: torch.Tensor | None):
    """LFM2-MoE: sigmoid scores, top-k of scores + expert bias, renormalised (+1e-6), scaled.
    The choice is masked, not the logits (sigmoid(-inf) + bias could still be chosen)."""
    scores = logits.sigmoid()  # [T,E]
    choice = scores + expert_bias if expert_bias is not None else scores
    if absent is not None:
        choice = choice.masked_fill(absent, float("-inf"))
    indices = torch.topk(choice, k=spec.top_k, dim=-1)[1]  # [T,K]
    weights = scores.gather(1, indices).type_as(logits)
    if absent is not None:
        weights = weights.masked_fill(absent[indices], 0.0)
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return _drop_absent(weights * spec.routed_scaling_factor, indices, absent)


def softmax_bias_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                      correction_bias: torch.Tensor | None, hidden_dtype: torch.dtype | None):
    """ERNIE 4.5: float32 softmax, top-k of the probabilities + the correction bias ([1,E]),
    the chosen probabilities renormalised by max(sum, norm_min), weights in the hidden dtype.
    Both the logits (so the present experts' probabilities renormalise among themselves) and
    the choice (0 + bias could still be chosen) are masked."""
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))  # [T,E]
    probs = F.softmax(logits, dim=1, dtype=torch.float)  # [T,E] float32
    choice = probs + correction_bias.squeeze() if correction_bias is not None else probs
    if absent is not None:
        choice = choice.masked_fill(absent, float("-inf"))
    indices = torch.topk(choice, spec.top_k, dim=-1)[1]  # [T,K]
    weights = torch.gather(probs, dim=-1, index=indices)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=spec.norm_min)
    if spec.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return _drop_absent(weights, indices, absent)


def sigmoid_bias_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                      correction_bias: torch.Tensor | None):
    """MiniMax-M2: logits in the model dtype, sigmoid in float32, *unsorted* top-k of the scores
    + the block's correction bias, the chosen scores renormalised (no epsilon), no scaling."""
    return _biased_sigmoid_topk(spec, logits, absent, correction_bias, None, sorted_topk=False)


def topk_sigmoid(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                 hidden_dtype: torch.dtype | None, correction_bias: torch.Tensor | None = None):
    """Cohere2-MoE with expert_selection_fn "sigmoid": top-k of the logits, sigmoid of those k
    (in the logits' dtype), renormalised per norm_topk_prob, in the hidden states' dtype.
    Kolibri: the top-k of float32 logits + its correction bias, sigmoid of the chosen logits."""
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))  # [T,E]: sigmoid(-inf) = 0
    choice = logits + correction_bias if correction_bias is not None else logits
    indices = torch.topk(choice, spec.top_k, dim=-1)[1]  # [T,K]
    weights = torch.sigmoid(logits.gather(-1, indices))
    if spec.renormalize:
        weights = weights / _row_sums(weights, absent)
    if spec.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return _drop_absent(weights, indices, absent)


def sigmoid_sorted_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                        correction_bias: torch.Tensor | None, hidden_dtype: torch.dtype | None):
    """Flint, Laguna, AFMoE: float32 sigmoid scores, *sorted* top-k of the scores (+ the gate's
    or the block's correction bias), the chosen scores renormalised (AFMoE: + 1e-20) and scaled
    (AFMoE's route_scale), weights in the hidden dtype where the row says so (Laguna)."""
    return _biased_sigmoid_topk(spec, logits, absent, correction_bias, hidden_dtype, sorted_topk=True)


def score_bias_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                    correction_bias: torch.Tensor | None):
    """DeepSeek-V4's learned layers: the config's score function (sqrt(softplus) by default) on
    the logits in their dtype, then as the sigmoid kinds: unsorted top-k of the scores + the
    correction bias, the chosen scores renormalised (+ 1e-20, its row says) and scaled."""
    from transformers.activations import ACT2FN

    return _biased_topk(spec, ACT2FN[spec.score_fn](logits), absent, correction_bias, None, sorted_topk=False)


def _biased_sigmoid_topk(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None,
                         correction_bias: torch.Tensor | None, hidden_dtype: torch.dtype | None, sorted_topk: bool):
    """_biased_topk on float32 sigmoid scores."""
    return _biased_topk(spec, logits.float().sigmoid(), absent, correction_bias, hidden_dtype, sorted_topk)


def _biased_topk(spec: RoutingSpec, scores: torch.Tensor, absent: torch.Tensor | None,
                 correction_bias: torch.Tensor | None, hidden_dtype: torch.dtype | None, sorted_topk: bool):
    """Top-k of scores [T,E] (+ a correction bias, added in its dtype's promotion: a float32 bias
    lifts DeepSeek-V4's bf16 scores to float32 for the choice), weights the chosen scores. The order
    of the top-k (sorted or not) is the family's, so the kernel picks ties as transformers does.
    The choice is masked, not the scores (an absent expert's 0 + bias could still be chosen)."""
    choice = scores + correction_bias if correction_bias is not None else scores
    if absent is not None:
        choice = choice.masked_fill(absent, float("-inf"))
    indices = torch.topk(choice, spec.top_k, dim=-1, sorted=sorted_topk)[1]  # [T,K]
    weights = scores.gather(-1, indices)
    if absent is not None:
        weights = weights.masked_fill(absent[indices], 0.0)
    if spec.renormalize and spec.renorm_epsilon:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_epsilon)
    elif spec.renormalize:
        weights = weights / _row_sums(weights, absent)
    weights = weights * spec.routed_scaling_factor
    if spec.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return _drop_absent(weights, indices, absent)


def _row_sums(weights: torch.Tensor, absent: torch.Tensor | None) -> torch.Tensor:
    """[T,1] sums for a renormalisation without an epsilon: as they are with every expert present,
    kept above 0 when masking could leave a row with nothing (0/0 would be NaN)."""
    sums = weights.sum(dim=-1, keepdim=True)
    return sums if absent is None else sums.clamp_min(torch.finfo(sums.dtype).tiny)


def sparsemixer_top2(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None):
    """PhiMoE: transformers' own sparsemixer in its inference form (no jitter, no sampling),
    on logits with absent experts at -inf."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))
    weights, indices = sparsemixer(logits, jitter_eps=spec.jitter_eps, training=False, top_k=spec.top_k)
    return _drop_absent(weights, indices, absent)


def _drop_absent(weights: torch.Tensor, indices: torch.Tensor, absent: torch.Tensor | None):
    """Slots that landed on an absent expert (only when fewer than K are present) select nothing."""
    if absent is None:
        return weights, indices
    chosen_absent = absent[indices]  # [T,K]
    return weights.masked_fill(chosen_absent, 0.0), indices.masked_fill(chosen_absent, UNUSED)
