"""More slots than one grouped matmul takes (torch: 1024 groups; a real-size budget holds
thousands of experts) are computed chunk by chunk, with the same result as one call."""

import torch
from torch import nn

from models import kernels


class SiluGate(nn.Module):
    is_concatenated = True

    def _apply_gate(self, proj):
        gate, up = proj.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


def test_chunked_grouped_matches_one_call(monkeypatch):
    torch.manual_seed(0)
    slots_total, hidden_size, inter, tokens, top_k = 40, 16, 8, 6, 4
    hidden = torch.randn(tokens, hidden_size)
    gate_up = torch.randn(slots_total, 2 * inter, hidden_size)
    down = torch.randn(slots_total, hidden_size, inter)
    slots = torch.randint(0, slots_total, (tokens * top_k,))
    weights = torch.rand(tokens * top_k, 1)
    whole = kernels._grouped(SiluGate(), hidden, slots, weights, top_k, gate_up, down)
    monkeypatch.setattr(kernels, "MAX_GROUPS", 16)  # 40 slots: chunks of 16, 16, 8
    chunked = kernels._grouped(SiluGate(), hidden, slots, weights, top_k, gate_up, down)
    torch.testing.assert_close(chunked, whole)
