"""One memory plan for the device and the host, computed before anything is allocated.

    plan = plan_memory(facts, PlanRequest(device="cuda", gpu_memory="24GiB"), device_memory("cuda"), host_memory())
    plan.expert_slots, plan.kv_tokens, plan.describe()

The device budget (`gpu_memory`: bytes, "24GiB", or "0.9" = that fraction of the
device's free memory; default: free memory less DEVICE_HEADROOM) is split, in this order:

    trunk          every non-expert weight (facts.trunk_bytes)
    margin         allocator fragmentation, cuBLAS workspaces: MARGIN_SHARE of the budget
                   (at least MIN_MARGIN_CUDA on a GPU)
    workspace      activations of the largest forward (estimate, see workspace_bytes)
    kv_cache       kv_tokens x the model's KV bytes per token
    expert_cache   whole expert slots, in what is left

KV follows vLLM: `--max-model-len` x `--max-concurrency` when both are given; otherwise
the KV takes at most KV_SHARE of what the trunk, margin, workspace and one token's
experts leave, never more than max_concurrency full-length requests, and the length
defaults to the model's context cut to what that KV holds. Requests share the KV tokens
page by page, so the full context is never reserved for every slot; the plan reports
how many full-length requests fit at once (`concurrency_at_max_len`). With `slot_rows` (the
server's decoder engine: each request holds a whole KV row), the KV is rows x length: the
one of them not given is what the share holds (at least one row of MIN_MODEL_LEN tokens).

On a GPU the host budget (`host_memory`, default HOST_SHARE of the available RAM) is the
pinned host tier's cap (models.host_tier); on the CPU the device is the host, so there
is no tier and the device budget defaults to DEVICE_SHARE_CPU of the available RAM.

A plan that cannot hold trunk + margin + workspace + the smallest KV (one request of
max_model_len, or MIN_MODEL_LEN tokens) + one token's top-k experts in every MoE layer
raises PlanError: one line naming the part that does not fit and by how many bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from .footprint import ModelFacts
from .quantised_fill import DEQUANT_WORKSPACE_BYTES

GiB = 1 << 30
MiB = 1 << 20
DEVICE_HEADROOM = (1 * GiB, 0.05)  # default device budget: free - max(1 GiB, 5% of total) (CUDA context growth)
DEVICE_SHARE_CPU = 0.7  # default budget on the CPU: this share of the available RAM
HOST_SHARE = 0.5  # default pinned host tier: this share of the available RAM
MARGIN_SHARE, MIN_MARGIN_CUDA = 0.04, 256 * MiB  # a GPU also needs room for cuBLAS workspaces, context growth
KV_SHARE = 0.25  # most of the free memory the KV takes by default; experts get the rest
MIN_MODEL_LEN = 512  # the shortest context a default plan settles for
CHUNK_FLOOR = 1 << 20  # slack when sizing the host chunks that hold one layer's working set
KV_ALIGN = 64  # KV tokens and default lengths are whole pages of the server's paged cache
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class PlanError(ValueError):
    """The budget cannot hold the plan; the message is one line naming the part and the shortfall."""


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    free: int  # the device's free memory, or the host's MemAvailable


@dataclass(frozen=True)
class PlanRequest:
    device: str = "cpu"  # "cuda" or "cpu"
    gpu_memory: str | int | float | None = None  # device budget; None = free memory less a headroom
    host_memory: str | int | float | None = None  # pinned host tier budget (GPU only); None = HOST_SHARE of RAM
    max_model_len: int | None = None
    max_concurrency: int | None = None
    default_concurrency: int = 1  # used when max_concurrency is None (the server: 16 batch slots)
    max_batch_tokens: int = 2048  # tokens in one forward (the server chunks prefill at 512)
    slot_rows: bool = False  # every request holds a KV row of max_model_len (cadre's slot-cache decoder)
    cache_bytes: int | None = None  # an explicit expert cache: checked against the plan
    cache_fraction: float | None = None


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    dtype_bytes: int
    budget_bytes: int  # the device budget the parts below split
    budget_source: str  # e.g. "--gpu-memory 24GiB" or "free memory 79.1 GiB less 4.0 GiB headroom"
    trunk_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    expert_cache_bytes: int
    margin_bytes: int
    slot_bytes: int
    expert_slots: int
    total_experts: int
    kv_tokens: int
    kv_bytes_per_token: int
    max_model_len: int
    max_concurrency: int
    concurrency_at_max_len: float  # full-length requests the KV holds at once (vLLM's "maximum concurrency")
    context: int  # the model's own max_position_embeddings
    host_budget_bytes: int  # 0 on the CPU (no pinned tier)
    host_tier_bytes: int  # the pinned tier's cap: whole entries of slot_bytes within the host budget
    host_tier_experts: int
    notes: tuple[str, ...] = field(default=())

    @property
    def expert_fraction(self) -> float:
        return self.expert_slots / self.total_experts if self.total_experts else 0.0

    @property
    def holds_every_expert(self) -> bool:
        return self.expert_slots >= self.total_experts

    def parts(self) -> dict[str, int]:
        """Bytes of each part of the device budget, plus the host tier (the gauges' `part` label)."""
        return {"trunk": self.trunk_bytes, "kv_cache": self.kv_cache_bytes, "workspace": self.workspace_bytes,
                "expert_cache": self.expert_cache_bytes, "margin": self.margin_bytes,
                "host_tier": self.host_tier_bytes}

    def as_fields(self) -> dict:
        """Flat fields for one structured log line (server.logs.log_event)."""
        fields = {k: v for k, v in asdict(self).items() if k != "notes"}
        fields["expert_fraction"] = round(self.expert_fraction, 4)
        fields["notes"] = list(self.notes)
        return fields

    def describe(self) -> str:
        """One line: each part's size, the expert slots, the KV tokens and lengths."""
        host = (f"; host tier {gib(self.host_tier_bytes)} pinned at most ({self.host_tier_experts} experts) of "
                f"{gib(self.host_budget_bytes)}" if self.device != "cpu" else "; no host tier (the device is the host)")
        return (f"memory plan ({self.device}, budget {gib(self.budget_bytes)} from {self.budget_source}): "
                f"trunk {gib(self.trunk_bytes)} + kv_cache {gib(self.kv_cache_bytes)} ({self.kv_tokens} tokens, "
                f"max_model_len {self.max_model_len}, max_concurrency {self.max_concurrency}, "
                f"{self.concurrency_at_max_len:.2f} at full length) + workspace {gib(self.workspace_bytes)} + "
                f"expert_cache {gib(self.expert_cache_bytes)} ({self.expert_slots} slots = "
                f"{self.expert_fraction:.1%} of {self.total_experts} experts) + margin {gib(self.margin_bytes)}"
                + host)


# --- budgets -------------------------------------------------------------------------------
def parse_budget(spec: str | int | float, available: int, what: str) -> tuple[int, str]:
    """(bytes, where they came from) for "25769803776", "24GiB", "512 MB", "0.9" or "90%" (of `available`)."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            return _fraction(float(text[:-1]) / 100, available, what, text)
        if isinstance(spec, float) or ("." in text and SIZE.match(text) and not SIZE.match(text)[2]):
            return _fraction(float(text), available, what, text)
    except ValueError:
        raise PlanError(f"{what} {text!r}: not a size (bytes, 24GiB, 512MB) or a fraction (0.9, 90%)") from None
    match = SIZE.match(text)
    if match is None or match[2].lower() not in UNITS:
        raise PlanError(f"{what} {text!r}: not a size (bytes, 24GiB, 512MB) or a fraction (0.9, 90%)")
    value = int(float(match[1]) * UNITS[match[2].lower()])
    if value <= 0:
        raise PlanError(f"{what} {text!r}: must be positive")
    return value, f"{what} {text}"


def _fraction(share: float, available: int, what: str, text: str) -> tuple[int, str]:
    if not 0 < share <= 1:
        raise PlanError(f"{what} {text!r}: a fraction must be in (0, 1]")
    return int(available * share), f"{what} {text} of {gib(available)} free"


def device_budget(request: PlanRequest, device: MemoryInfo) -> tuple[int, str]:
    if request.gpu_memory is not None:
        return parse_budget(request.gpu_memory, device.free, "--gpu-memory")
    if request.device == "cpu":
        return int(device.free * DEVICE_SHARE_CPU), f"{DEVICE_SHARE_CPU:.0%} of {gib(device.free)} available RAM"
    floor, share = DEVICE_HEADROOM
    headroom = max(floor, int(device.total * share))
    return max(0, device.free - headroom), f"free memory {gib(device.free)} less {gib(headroom)} headroom"


def host_budget(request: PlanRequest, host: MemoryInfo | None) -> int:
    if request.device == "cpu":
        return 0
    available = host.free if host is not None else 0
    if request.host_memory is not None:
        return parse_budget(request.host_memory, available, "--host-memory")[0]
    return int(available * HOST_SHARE)


# --- the plan ----------------------------------------------------------------------------------
def plan_memory(facts: ModelFacts, request: PlanRequest, device: MemoryInfo,
                host: MemoryInfo | None = None) -> MemoryPlan:
    """Split the budgets; PlanError (one line) when they cannot hold the smallest plan."""
    _check_request(facts, request)
    budget, source = device_budget(request, device)
    margin = max(MIN_MARGIN_CUDA if request.device == "cuda" else 0, int(budget * MARGIN_SHARE))
    concurrency = request.max_concurrency or request.default_concurrency
    explicit_slots = _explicit_slots(facts, request)
    min_slots = explicit_slots or facts.working_set
    min_len = request.max_model_len or min(facts.context, MIN_MODEL_LEN)
    _check_minimum(facts, request, budget, source, margin, min_len, min_slots)
    kv_tokens, max_len, concurrency, notes = _size_kv(facts, request, budget - facts.trunk_bytes - margin,
                                                      min_slots, concurrency)
    _check_kv(facts, request, budget, source, margin, kv_tokens, concurrency, min_slots)
    workspace = workspace_bytes(facts, request, kv_tokens, concurrency)
    left = budget - facts.trunk_bytes - margin - workspace - kv_bytes(facts, kv_tokens, concurrency)
    slots = explicit_slots or min(facts.total_experts, left // facts.expert_bytes)
    if slots * facts.expert_bytes > left:
        _refuse(f"the expert cache ({slots} slots x {mb(facts.expert_bytes)})", slots * facts.expert_bytes, left,
                budget, source)
    host_bytes = host_budget(request, host)
    host_pinned, host_experts = _host_tier(facts, request, host_bytes)
    return MemoryPlan(
        device=request.device, dtype_bytes=facts.itemsize, budget_bytes=budget, budget_source=source,
        trunk_bytes=facts.trunk_bytes, kv_cache_bytes=kv_bytes(facts, kv_tokens, concurrency),
        workspace_bytes=workspace, expert_cache_bytes=slots * facts.expert_bytes, margin_bytes=margin,
        slot_bytes=facts.expert_bytes, expert_slots=slots, total_experts=facts.total_experts, kv_tokens=kv_tokens,
        kv_bytes_per_token=facts.kv_bytes_per_token, max_model_len=max_len, max_concurrency=concurrency,
        concurrency_at_max_len=kv_tokens / max_len, context=facts.context, host_budget_bytes=host_bytes,
        host_tier_bytes=host_pinned, host_tier_experts=host_experts, notes=tuple(notes),
    )


def kv_bytes(facts: ModelFacts, tokens: int, sequences: int) -> int:
    return tokens * facts.kv_bytes_per_token + sequences * facts.kv_bytes_per_sequence


def workspace_bytes(facts: ModelFacts, request: PlanRequest, kv_tokens: int, concurrency: int) -> int:
    """Activations at the peak of one forward of max_batch_tokens tokens (an estimate, on the high side).

    Per batch token, the largest of: the attention's q/k/v/out rows, a dense MLP's rows, or the
    experts path's top-k rows (input, gate/up, activation, output in float32), plus 4 hidden rows
    of residual stream. Per cached token read in a layer, the keys and values attention sees
    (decompressed heads for MLA, repeated heads for grouped-query attention). The paged
    attention's mask, [batch tokens, KV + batch tokens]. And one row of logits (model dtype and
    float32) per sequence: generate() and continuous batching (transformers 5.17 and 5.24) both
    keep only the last position of each sequence before the LM head. A store of quantised
    experts adds the dequantisation's bound (models/quantised_fill.py), which the copy stream
    may use while a forward runs.
    """
    a = facts.itemsize
    hidden, heads = facts.hidden_size, facts.num_heads
    k_dim, v_dim = facts.head_dims
    tokens = min(request.max_batch_tokens, request.max_model_len or facts.context)
    attention = a * heads * (2 * k_dim + 2 * v_dim)
    dense = a * 3 * facts.dense_intermediate
    experts = facts.top_k * (hidden * (2 * a + 4) + 3 * facts.expert_intermediate * a)
    logits = facts.vocab_size * (a + 4)
    per_token = 4 * hidden * a + max(attention, dense, experts)
    per_cached_token = a * heads * (k_dim + v_dim)
    mask = a * tokens * (kv_tokens + tokens)
    dequantisation = DEQUANT_WORKSPACE_BYTES if facts.quantised_experts else 0  # beside the forward, on the copy stream
    return tokens * per_token + kv_tokens * per_cached_token + mask + concurrency * logits + dequantisation


def _size_kv(facts: ModelFacts, request: PlanRequest, after_trunk: int, min_slots: int,
             concurrency: int) -> tuple[int, int, int, list[str]]:
    """(KV tokens, max_model_len, max_concurrency, notes) chosen as the module docstring says."""
    notes: list[str] = []
    if request.max_model_len and request.max_concurrency:
        return request.max_concurrency * request.max_model_len, request.max_model_len, concurrency, notes
    room = after_trunk - min_slots * facts.expert_bytes - workspace_bytes(facts, request, 0, concurrency)
    share_tokens = int(room * KV_SHARE) // max(1, facts.kv_bytes_per_token)
    floor = request.max_model_len or min(facts.context, MIN_MODEL_LEN)
    if request.slot_rows:
        return (*_size_rows(facts, request, share_tokens, floor, concurrency), notes)
    want_len = request.max_model_len or facts.context
    tokens = max(floor, min(concurrency * want_len, share_tokens))
    tokens = max(floor, tokens // KV_ALIGN * KV_ALIGN)
    max_len = request.max_model_len or min(facts.context, tokens)
    if max_len < facts.context and not request.max_model_len:
        notes.append(f"max_model_len {max_len} < the model's context {facts.context}: a full context would "
                     f"take more than {KV_SHARE:.0%} of the memory left for KV and experts")
    return tokens, max_len, concurrency, notes


def _size_rows(facts: ModelFacts, request: PlanRequest, share_tokens: int, floor: int,
               concurrency: int) -> tuple[int, int, int]:
    """(KV tokens, max_model_len, rows) when every request holds a whole row: the rows and the
    length that are not given share the KV, at least one row of `floor` tokens."""
    if request.max_model_len:  # the length is given: as many rows as the share holds, up to the default
        rows = max(1, min(concurrency, share_tokens // request.max_model_len))
        return rows * request.max_model_len, request.max_model_len, rows
    length = min(facts.context, share_tokens // concurrency // KV_ALIGN * KV_ALIGN)
    if length < floor and not request.max_concurrency:  # fewer rows rather than rows too short
        concurrency = max(1, share_tokens // floor)
        length = floor
    length = max(length, floor)
    return concurrency * length, length, concurrency


def _check_request(facts: ModelFacts, request: PlanRequest) -> None:
    if request.max_model_len is not None and request.max_model_len > facts.context:
        raise PlanError(f"--max-model-len {request.max_model_len} exceeds the model's context of "
                        f"{facts.context} tokens (max_position_embeddings)")
    if request.cache_bytes is not None and request.cache_fraction is not None:
        raise PlanError("give --cache-bytes or --cache-fraction, not both")


def _explicit_slots(facts: ModelFacts, request: PlanRequest) -> int | None:
    """Slots asked for with --cache-bytes / --cache-fraction (at least one), or None."""
    if request.cache_bytes is not None:
        if request.cache_bytes < facts.expert_bytes:
            raise PlanError(f"--cache-bytes {request.cache_bytes} is smaller than one expert "
                            f"({facts.expert_bytes} bytes)")
        return min(facts.total_experts, request.cache_bytes // facts.expert_bytes)
    if request.cache_fraction is not None:
        return max(1, int(round(facts.total_experts * request.cache_fraction)))
    return None


def _check_minimum(facts, request, budget, source, margin, min_len, min_slots) -> None:
    """Refuse, naming the first part that does not fit, unless the smallest plan fits."""
    concurrency = 1 if not (request.max_model_len and request.max_concurrency) else request.max_concurrency
    kv_tokens = min_len * concurrency
    parts = [
        ("the trunk", facts.trunk_bytes),
        ("the margin", margin),
        ("the workspace", workspace_bytes(facts, request, kv_tokens, concurrency)),
        (f"the KV cache ({kv_tokens} tokens x {facts.kv_bytes_per_token} bytes)",
         kv_bytes(facts, kv_tokens, concurrency)),
        (f"the expert cache ({min_slots} slots x {mb(facts.expert_bytes)}"
         + (", one token's top-k in every MoE layer)" if min_slots == facts.working_set else ")"),
         min_slots * facts.expert_bytes),
    ]
    used = 0
    for name, size in parts:
        if used + size > budget:
            _refuse(name, size, budget - used, budget, source)
        used += size


def _check_kv(facts, request, budget, source, margin, kv_tokens, concurrency, min_slots) -> None:
    """The chosen KV (rows of a given length, say) beside the smallest expert cache, or PlanError."""
    kv = kv_bytes(facts, kv_tokens, concurrency)
    left = (budget - facts.trunk_bytes - margin - workspace_bytes(facts, request, kv_tokens, concurrency)
            - min_slots * facts.expert_bytes)
    if kv > left:
        _refuse(f"the KV cache ({kv_tokens} tokens x {facts.kv_bytes_per_token} bytes, beside the smallest "
                f"expert cache)", kv, left, budget, source)


def _refuse(name: str, size: int, left: int, budget: int, source: str):
    short = size - max(0, left)
    raise PlanError(f"memory plan does not fit: {name} needs {size} bytes ({gib(size)}) but the device budget of "
                    f"{gib(budget)} ({source}) has {max(0, left)} bytes left for it: short by {short} bytes "
                    f"({short / GiB:.3g} GiB)")


def _host_tier(facts: ModelFacts, request: PlanRequest, host_bytes: int) -> tuple[int, int]:
    """(bytes pinned at most, experts held) by the pinned tier; refused below one layer's working
    set (top_k experts). Never more than every expert of the store needs."""
    if request.device == "cpu":
        return 0, 0
    from .host_tier import tier_size

    entry = facts.host_bytes_per_expert
    pinned, entries = tier_size(host_bytes, entry, facts.total_experts)
    need = min(facts.top_k, facts.total_experts)
    if entries < need:
        needed = tier_size(2 * need * entry + CHUNK_FLOOR, entry, need)[0]  # the chunks that hold `need`
        raise PlanError(f"host budget of {gib(host_bytes)} pins {entries} experts, fewer than one layer's "
                        f"working set of {need} (top_k x {mb(entry)}): short by {needed - host_bytes} bytes "
                        f"({(needed - host_bytes) / GiB:.3g} GiB); raise --host-memory")
    return pinned, entries


def gib(nbytes: int) -> str:
    """GiB with two decimals, or MiB below one GiB (a tiny model's parts would all read 0.00 GiB)."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.1f} MiB"


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


# --- inputs measured on this machine ---------------------------------------------------------------
def device_memory(device: str) -> MemoryInfo:
    """The device's total and free memory (on the CPU, the host's RAM)."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return MemoryInfo(total=total, free=free)
    return host_memory()


def host_memory() -> MemoryInfo:
    """RAM total and available (MemAvailable: what can be had without swapping)."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    if "MemTotal" in fields and "MemAvailable" in fields:
        return MemoryInfo(total=fields["MemTotal"], free=fields["MemAvailable"])
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return MemoryInfo(total=pages * size, free=os.sysconf("SC_AVPHYS_PAGES") * size)

