"""SNARC salience signals, each computed from what the model already has.

Legend for shape comments: T tokens, E experts, K top-k slots, V vocabulary.

Every function is pure (tensors in, tensors out) and cheap: a softmax, a log, a
gather. `UsageHistory` keeps the only state the signals need, exponentially decayed
per-expert counts and routing-weight mass, and is fed by a routing listener.

| signal   | formula (this module)                                        | drives              |
|----------|--------------------------------------------------------------|---------------------|
| Surprise | s_t = -log p(x_t); router shift KL(p_t || mean p)            | wider prefetch      |
| Novelty  | n_e = 1 / (1 + c_e), c_e = decayed use count of expert e     | eviction priority   |
| Arousal  | a_t = 1 - H(p_t) / log E  (1 = router certain, 0 = uniform)  | dynamic k           |
| Reward   | r_e = decayed sum of routing weight expert e carried         | keep resident       |
| Conflict | m = p(chosen) - p(best resident alternative), per slot       | substitute resident |
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .exact import UNUSED


def surprisal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Surprise of each token: s_t = -log softmax(logits_t)[x_t], in nats.

    logits [T,V], targets [T] -> [T].
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [T,V]
    return -log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [T]


def router_shift(probs: torch.Tensor, baseline: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Surprise of the *router*: KL(p_t || b) = sum_e p_te (log p_te - log b_e), in nats.

    How far this token's routing distribution moved from the recent average b (e.g. an
    EMA of past p_t): 0 when routing is as usual, large when the context shifts.
    probs [T,E], baseline [E] -> [T].
    """
    p = probs.float().clamp_min(eps)  # [T,E]
    b = baseline.float().clamp_min(eps)  # [E]
    return (p * (p.log() - b.log())).sum(dim=-1)  # [T]


def novelty(use_counts: torch.Tensor) -> torch.Tensor:
    """Novelty of each expert: n_e = 1 / (1 + c_e), c_e its decayed recent use count.

    1 for an expert not used recently, towards 0 for one used on every token.
    use_counts [E] (or any shape) -> same shape.
    """
    return 1.0 / (1.0 + use_counts.float().clamp_min(0))


def arousal(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Router confidence: a_t = 1 - H(p_t) / log E, H(p) = -sum_e p_e log p_e.

    1 when all mass is on one expert, 0 for a uniform router. Absent experts (p = 0)
    contribute nothing to H. probs [T,E] -> [T].
    """
    p = probs.float()  # [T,E]
    entropy = -(p * p.clamp_min(eps).log()).sum(dim=-1)  # [T]
    return 1.0 - entropy / math.log(p.shape[-1])


def top1_margin(probs: torch.Tensor) -> torch.Tensor:
    """The other Arousal reading: p_(1) - p_(2), the lead of the top expert. probs [T,E] -> [T]."""
    top2 = probs.float().topk(2, dim=-1).values  # [T,2]
    return top2[:, 0] - top2[:, 1]


def reward(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routing-weight mass each expert carried: r_e = sum_{t,k: i_tk = e} w_tk.

    Unused slots (index -1) carry nothing. weights [T,K], indices [T,K] -> [E].
    """
    used = indices != UNUSED  # [T,K]
    mass = torch.zeros(num_experts, dtype=torch.float)
    mass.index_add_(0, indices[used].long(), weights[used].float())
    return mass  # [E]


def conflict(probs: torch.Tensor, indices: torch.Tensor, resident: torch.Tensor):
    """Margin between each chosen non-resident expert and the best resident alternative.

    m_tk = p_t[i_tk] - max_{e resident, e not chosen by t} p_te. A small margin means a
    resident expert is almost as good a choice as the one that would have to be loaded.
    Slots whose expert is resident (or unused, or with no resident alternative) get
    +inf: nothing to resolve. probs [T,E], indices [T,K], resident bool [E] ->
    (margin [T,K], alternative [T,K] expert id, -1 where none).
    """
    probs = probs.float()
    safe = indices.clamp_min(0).long()  # [T,K]
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, safe, indices != UNUSED)  # [T,E]
    candidates = probs.masked_fill(~resident.unsqueeze(0) | chosen, float("-inf"))  # [T,E]
    # a token may need several substitutes: the k-th non-resident slot takes the k-th best
    # resident alternative, so two slots never collapse onto one expert
    ranked_p, ranked_e = candidates.sort(dim=-1, descending=True)  # [T,E]
    needs = (indices != UNUSED) & ~resident[safe]  # [T,K]
    rank = (needs.cumsum(dim=-1) - 1).clamp_min(0)  # [T,K]
    alt_p = ranked_p.gather(1, rank)  # [T,K]
    alt_e = ranked_e.gather(1, rank)  # [T,K]
    margin = probs.gather(1, safe) - alt_p  # [T,K]
    valid = needs & torch.isfinite(alt_p)
    margin = margin.masked_fill(~valid, float("inf"))
    alt_e = alt_e.masked_fill(~valid, UNUSED)
    return margin, alt_e


USAGE_DECAY = 0.95  # per event of a layer: a horizon of about 20 forwards


class UsageHistory:
    """Decayed per-(layer, expert) use counts and weight mass, fed by routing events.

    After each observed event of a layer: c <- decay * c + uses, r <- decay * r + mass.
    With decay d the history's horizon is about 1 / (1 - d) events of that layer.
    """

    def __init__(self, num_experts: int, decay: float = USAGE_DECAY):
        self.num_experts, self.decay = num_experts, decay
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [E]
        self.mass: dict[int, torch.Tensor] = {}  # layer -> [E]
        self._counts_list: dict[int, list[float]] = {}
        self._mass_list: dict[int, list[float]] = {}

    def observe(self, layer: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        used = indices[indices != UNUSED].long()
        uses = torch.bincount(used, minlength=self.num_experts).float()  # [E]
        mass = reward(weights, indices, self.num_experts)  # [E]
        zeros = torch.zeros(self.num_experts)
        self.counts[layer] = self.decay * self.counts.get(layer, zeros) + uses
        self.mass[layer] = self.decay * self.mass.get(layer, zeros) + mass
        # plain-float copies: eviction reads single entries, where a tensor index costs microseconds
        self._counts_list[layer] = self.counts[layer].tolist()
        self._mass_list[layer] = self.mass[layer].tolist()

    def __call__(self, event) -> None:  # a runtime routing listener
        self.observe(event.layer, event.experts, event.weights)

    def novelty(self, layer: int, expert: int) -> float:
        """1 / (1 + c_e), as `novelty()`, for one expert."""
        counts = self._counts_list.get(layer)
        return 1.0 if counts is None else 1.0 / (1.0 + max(counts[expert], 0.0))

    def reward(self, layer: int, expert: int) -> float:
        mass = self._mass_list.get(layer)
        return 0.0 if mass is None else mass[expert]
