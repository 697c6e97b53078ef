"""The experts' compute on slot buffers: what transformers' experts paths compute, in their order.

Legend: T tokens, K top-k, S = T*K (token, slot) rows, H hidden, I expert intermediate
size, G slots of the buffers passed in.

Two paths, the same two transformers has:
- gathered (`batched_mm`): each row gathers its expert's weights and runs one bmm; no
  sort and no host work, the cheapest at decode where S is a handful of rows on a GPU;
- grouped (`grouped_mm`): rows sorted by slot, one grouped matmul over the slot buffers;
  for prefill, and on CPU, where the grouped kernel wins at any size.

Either way the routing weight multiplies each row and the K rows of a token are summed in
slot order (`.view(T, K, H).sum(1)`), as transformers does, so with the same kernels the
result is bit-identical.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("cadre.kernels")

# On a GPU, up to this many (token, slot) rows, gathering the experts' weights for a bmm
# is cheaper than a grouped matmul (measured in bench/decode.py); on CPU the grouped
# kernel wins (transformers grouped_mm 36 tok/s vs batched_mm 15 on the demo model).
GATHER_ROWS = 32
MAX_GROUPS = 512  # torch 2.11 refuses 1024 groups on an H200 ("more than 1024"); half is safe

_grouped_support: dict[tuple[str, torch.dtype], bool] = {}


def expert_mlp(module: torch.nn.Module, hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
               gate_up: torch.Tensor, down: torch.Tensor, reduce: bool = True,
               biases: tuple[torch.Tensor, torch.Tensor] | None = None, gather_rows: int = GATHER_ROWS) -> torch.Tensor:
    """hidden [T,H], slots [T,K] into gate_up [G,2I,H] / down [G,H,I], weights [T,K]
    -> [T,H] (reduce) or the weighted rows [T,K,H]. `module` is the family's experts module:
    its `_apply_gate` turns the gate/up projection into the activation. biases: the slots'
    (gate_up [G,2I], down [G,H]) where the family's experts have them (gpt-oss). On a GPU, up
    to `gather_rows` rows take the gathered path (RuntimeConfig.gather_rows)."""
    num_tokens, top_k = slots.shape
    if hidden.is_cuda and (num_tokens * top_k <= gather_rows or not _grouped_capturable(hidden)):
        rows = _gathered(module, hidden, slots.reshape(-1), gate_up, down, biases)  # [S,H]
        rows = rows * weights.reshape(-1, 1)  # [S,H]
    else:
        rows = _grouped(module, hidden, slots.reshape(-1), weights.reshape(-1, 1), top_k, gate_up, down, biases)
    rows = rows.view(num_tokens, top_k, -1)  # [T,K,H]
    if not reduce:
        return rows
    return rows.sum(dim=1).to(hidden.dtype)  # [T,H]


def _gathered(module, hidden, slots, gate_up, down, biases=None) -> torch.Tensor:
    top_k = slots.shape[0] // hidden.shape[0]
    x = hidden.repeat_interleave(top_k, dim=0).to(gate_up.dtype)  # [S,H]
    proj = torch.bmm(gate_up[slots], x.unsqueeze(-1)).squeeze(-1)  # [S,2I]
    if biases is not None:
        proj = proj + biases[0][slots]  # [S,2I]
    act = module._apply_gate(_module_layout(module, proj))  # [S,I]
    y = torch.bmm(down[slots], act.unsqueeze(-1)).squeeze(-1)  # [S,H]
    return y + biases[1][slots] if biases is not None else y


def _module_layout(module, proj: torch.Tensor) -> torch.Tensor:
    """proj [S,2I] from slots (gate rows first) in the layout the family's `_apply_gate`
    reads: unchanged, or interleaved gate0, up0, gate1, ... (gpt-oss)."""
    if getattr(module, "is_concatenated", True):
        return proj
    gate, up = proj.chunk(2, dim=-1)  # [S,I] each
    return torch.stack((gate, up), dim=-1).flatten(-2)  # [S,2I]


def _grouped(module, hidden, slots, weights, top_k, gate_up, down, biases=None) -> torch.Tensor:
    groups = gate_up.shape[0]
    if groups > MAX_GROUPS:
        return _grouped_in_chunks(module, hidden, slots, weights, top_k, gate_up, down, biases)
    order = torch.argsort(slots, stable=True)  # [S] rows sorted by slot
    histc_input = slots.float() if slots.device.type == "cpu" else slots.int()
    counts = torch.histc(histc_input, bins=groups, min=0, max=groups - 1)  # [G]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [G] computed on the device: no host sync
    x = hidden[order // top_k].to(gate_up.dtype)  # [S,H]
    proj = grouped_mm(x, gate_up.transpose(-2, -1), offsets)  # [S,2I]
    if biases is not None:
        proj = proj + biases[0][slots[order]]  # [S,2I]
    y = grouped_mm(module._apply_gate(_module_layout(module, proj)), down.transpose(-2, -1), offsets)  # [S,H]
    if biases is not None:
        y = y + biases[1][slots[order]]  # [S,H]
    rows = torch.empty_like(y, dtype=torch.promote_types(y.dtype, weights.dtype))
    rows[order] = y * weights[order]
    return rows


def _grouped_in_chunks(module, hidden, slots, weights, top_k, gate_up, down, biases) -> torch.Tensor:
    """More slots than one grouped call takes (a real-size budget holds thousands): one call
    per MAX_GROUPS slots, each over every row, the rows of other chunks sent to its first
    slot and dropped. No host synchronisation, so a captured step can hold it; the extra
    compute is paid by prefill and large batches only (small batches gather)."""
    groups = gate_up.shape[0]
    rows = None
    for first in range(0, groups, MAX_GROUPS):
        end = min(first + MAX_GROUPS, groups)
        inside = (slots >= first) & (slots < end)  # [S]
        local = torch.where(inside, slots - first, torch.zeros_like(slots))
        chunk_biases = (biases[0][first:end], biases[1][first:end]) if biases is not None else None
        part = _grouped(module, hidden, local, weights, top_k, gate_up[first:end], down[first:end], chunk_biases)
        rows = torch.where(inside.unsqueeze(-1), part, torch.zeros_like(part) if rows is None else rows)
    return rows


def _grouped_capturable(hidden: torch.Tensor) -> bool:
    """Inside a CUDA graph capture the grouped path needs torch's kernel (the fallback reads
    the offsets on the host); the kernel was probed by the eager step that precedes every
    capture, so no probe runs while capturing."""
    if not torch.cuda.is_current_stream_capturing():
        return True
    return _grouped_support.get((str(hidden.device), hidden.dtype), False)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [R,in] @ grouped weight [G,in,out] -> [R,out], rows grouped by `offsets`.

    torch's grouped kernel where this device and dtype have one (probed once, so a real
    error such as running out of memory is never mistaken for a missing kernel), else the
    same products one group at a time (logged once: it needs the offsets on the host).
    """
    # Under torch.compile the grouped kernel's shape rules admit bfloat16 only (as
    # transformers' _can_use_grouped_mm also says); other dtypes take the loop there.
    compiling = torch.compiler.is_compiling()
    if (not compiling or x.dtype == torch.bfloat16) and _has_grouped_kernel(x.device, x.dtype):
        return F.grouped_mm(x, weight, offs=offsets)
    out = x.new_empty((x.shape[0], weight.shape[-1]))
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[group], out=out[start:end])
        start = end
    return out


@torch.compiler.disable
def _has_grouped_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _grouped_support:
        _grouped_support[key] = _probe_grouped(device, dtype)
        if not _grouped_support[key]:
            log.warning("no grouped matmul kernel for %s on %s: experts run one group at a time (slower)",
                        dtype, device)
    return _grouped_support[key]


def _probe_grouped(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    x = torch.ones((16, 16), dtype=dtype, device=device)
    w = torch.ones((2, 16, 16), dtype=dtype, device=device)
    try:
        F.grouped_mm(x, w, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True
