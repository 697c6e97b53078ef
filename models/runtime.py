"""Runtime: a transformers model served from an expert store through the expert cache.

    rt = Runtime.from_store("STORE", RuntimeConfig(device="cpu", cache_fraction=0.5))
    ids = rt.generate("To be, or not to be", max_new_tokens=32)
    rt.cache.stats()

The model is transformers' own (attention, KV cache, generate()); only the experts
and the routing decision are cadre's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedModel

from extractor.store import ExpertStore, StoreError
from router.eviction import EVICTION_POLICIES
from router.policy import make_policy, policy_class

from .cache import ExpertCache, LRUPolicy
from .footprint import facts_from_config, facts_from_store
from .loading import expert_layers, install_router, load_model, keeps_own_router, moe_blocks, routing_spec
from .memory_plan import MemoryPlan, PlanRequest, device_memory, host_memory, plan_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eviction_class(name: str) -> type:
    policies = {"lru": LRUPolicy, **EVICTION_POLICIES}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r} (known: {', '.join(sorted(policies))})")
    return policies[name]


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"  # "auto" picks cuda when available
    dtype: str | None = None  # None: the store's dtype
    cache_bytes: int | None = None  # expert cache budget in bytes ...
    cache_fraction: float | None = None  # ... or as a fraction of all the store's experts (default 1.0)
    host_cache_bytes: int | None = None  # pinned host tier (GPU only) in bytes: same as host_memory (older name)
    gpu_memory: str | int | None = None  # device budget: bytes, "24GiB" or "0.9" of free; None = free less a headroom
    host_memory: str | int | None = None  # pinned host tier budget (GPU only); None = a safe share of available RAM
    max_model_len: int | None = None  # KV room kept for a sequence this long; None = the plan's choice
    max_concurrency: int | None = None  # sequences decoded together (default 1)
    plan: MemoryPlan | None = None  # a plan made before loading (the server's); None = plan in from_store
    full_depth: bool = False  # a miss of expert E at layer L also prefetches E in deeper layers
    routing: str = "exact"  # a policy of router.policy.POLICIES
    eviction: str = "lru"  # "lru" or a policy of router.eviction (when present)
    prefetch_layers: int = 0  # > 0: predict the next N MoE layers' experts and load them ahead
    prefetch_tier: str = "device"  # where those loads go: device slots, or "host": store reads into the host tier
    decoder: str = "auto"  # greedy generate() through models/decoder.py: auto (on CUDA) | on | off
    compile: bool = False  # torch.compile the norms, gates and experts' compute (models/compile.py)
    compile_step: bool = False  # torch.compile each decode step's forward (a budget holding every expert)
    load_workers: int | None = None  # threads reading misses from the store; None: 1 on CPU, up to 8 on a GPU
    # On a GPU, steps of at most this many (token, expert) rows gather their experts' weights for a
    # bmm; larger ones run a grouped matmul over the slot buffers (models/kernels.py). None: GATHER_ROWS.
    gather_rows: int | None = None

    def __post_init__(self):
        if self.cache_bytes is not None and self.cache_fraction is not None:
            raise ValueError("give cache_bytes or cache_fraction, not both")
        if self.cache_fraction is not None and not 0 < self.cache_fraction <= 1:
            raise ValueError(f"cache_fraction must be in (0, 1], got {self.cache_fraction}")
        if self.host_cache_bytes is not None and self.host_memory is not None:
            raise ValueError("give host_memory or host_cache_bytes, not both")
        if self.decoder not in ("auto", "on", "off"):
            raise ValueError(f"decoder must be auto, on or off, got {self.decoder!r}")
        if self.load_workers is not None and self.load_workers < 1:
            raise ValueError(f"load_workers must be >= 1, got {self.load_workers}")
        if self.gather_rows is not None and self.gather_rows < 0:
            raise ValueError(f"gather_rows must be >= 0, got {self.gather_rows}")
        if self.prefetch_layers < 0:
            raise ValueError(f"prefetch_layers must be >= 0, got {self.prefetch_layers}")
        if self.prefetch_tier not in ("device", "host"):
            raise ValueError(f"prefetch_tier must be device or host, got {self.prefetch_tier!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        policy_class(self.routing), eviction_class(self.eviction)  # unknown names fail here, before any loading

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class RoutingEvent:
    """One MoE layer of one forward: T flattened tokens (batch-major), K slots."""

    layer: int
    experts: torch.Tensor  # [T,K] long, CPU; -1 = slot unused
    weights: torch.Tensor  # [T,K] float, CPU
    outcomes: dict[int, str]  # expert -> "hit" | "miss" | "prefetched"
    load_seconds: float  # time this layer waited for experts to become resident


class Runtime:
    def __init__(self, store: ExpertStore, model: PreTrainedModel, cache: ExpertCache, tokenizer,
                 config: RuntimeConfig, policy=None, plan: MemoryPlan | None = None):
        self.store, self.model, self.cache, self.tokenizer, self.config = store, model, cache, tokenizer, config
        self.plan = plan  # the memory plan the cache and host tier were sized by
        self.device = config.resolved_device()
        self._listeners: list[Callable[[RoutingEvent], None]] = []
        self.policy = policy or make_policy(config.routing, config.prefetch_layers)
        self.policy.bind(self, routing_spec(store, model.config), self._absent_masks())
        if cache.holds_everything:  # the budget holds the whole store: load it once, never miss
            cache.preload([(l, e) for l in store.moe_layers for e in store.experts_present(l)])
        on_miss = self._prefetch_deeper if config.full_depth else None
        for layer, experts in expert_layers(model).items():
            experts.bind(cache, on_route=self._emit, on_miss=on_miss, before=self.policy.before_experts)
            if config.gather_rows is not None:
                experts.gather_rows = config.gather_rows
        for layer, block in moe_blocks(model).items():
            if keeps_own_router(block, self.policy.spec):  # transformers' router: no choice to mask
                self._require_every_expert(layer)
                continue
            install_router(block, self._router_for(layer), self.policy.spec)
        if config.compile:
            from .compile import compile_hot_paths

            compile_hot_paths(model, self.policy.spec)

    @classmethod
    def from_store(cls, root: str | Path, config: RuntimeConfig = RuntimeConfig(), policy=None) -> "Runtime":
        store = ExpertStore.open(root)
        device = config.resolved_device()
        dtype = DTYPES[config.dtype] if config.dtype else store.dtype
        plan = config.plan or plan_for_store(store, config, dtype)  # PlanError before anything is allocated
        model = load_model(store, dtype=dtype, device=device)
        cache = ExpertCache(store, device=device, dtype=dtype, capacity_bytes=plan.expert_cache_bytes,
                            host_capacity_bytes=plan.host_tier_bytes or None, policy=make_eviction(config.eviction),
                            load_workers=config.load_workers)
        return cls(store, model, cache, _tokenizer(store.root), config, policy, plan)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, config: RuntimeConfig = RuntimeConfig(),
                        store_dir: str | Path | None = None, policy=None) -> "Runtime":
        """Extract `checkpoint` (a directory or a Hub id org/name[@revision], downloaded first) into
        a store (cached; re-runs skip verified shards) and load it."""
        from extractor import extract_store
        from extractor.hub import resolve_model

        checkpoint = resolve_model(str(checkpoint))
        store_dir = Path(store_dir) if store_dir else default_store_dir(checkpoint)
        extract_store(checkpoint, store_dir, quiet=True)
        return cls.from_store(store_dir, config, policy)

    # --- routing -----------------------------------------------------------------
    def _absent_masks(self) -> dict[int, torch.Tensor | None]:
        masks = {}
        for layer in moe_blocks(self.model):
            present = self.store.experts_present(layer)
            if len(present) == self.store.num_experts:
                masks[layer] = None  # nothing to mask: skip the op, keep transformers' exact ops
                continue
            absent = torch.ones(self.store.num_experts, dtype=torch.bool)
            absent[present] = False
            masks[layer] = absent.to(self.device)
        return masks

    def _require_every_expert(self, layer: int) -> None:
        missing = self.store.num_experts - len(self.store.experts_present(layer))
        if missing:
            raise StoreError(f"{self.store.root}: layer {layer} keeps transformers' router (DeepSeek-V4's routing by "
                             f"token id, ZAYA's), which cannot be masked, and the store lacks {missing} of its experts; "
                             "extract every expert of such layers")

    def _router_for(self, layer: int):
        return lambda logits, gate, hidden_dtype, bias: self.policy.route(layer, logits, gate, hidden_dtype=hidden_dtype,
                                                                          bias=bias)

    def prefetch(self, keys) -> int:
        """Start loading (layer, expert) keys a speculative policy predicts: into device slots, or
        with prefetch_tier "host" only from the store into the host tier. Returns loads started."""
        if self.config.prefetch_tier == "host":
            return self.cache.prefetch_host(keys)
        return self.cache.prefetch(keys)

    def _prefetch_deeper(self, layer: int, experts: list[int]) -> None:
        deeper = [l for l in self.store.moe_layers if l > layer]
        self.cache.prefetch((l, e) for l in deeper for e in experts)

    # --- observation -------------------------------------------------------------
    def add_routing_listener(self, fn: Callable[[RoutingEvent], None]) -> None:
        self._listeners.append(fn)

    def remove_routing_listener(self, fn: Callable[[RoutingEvent], None]) -> None:
        self._listeners.remove(fn)

    @contextlib.contextmanager
    def routing_muted(self):
        """No routing events inside (a forward recomputed to check another: its tokens were reported)."""
        listeners, self._listeners = self._listeners, []
        try:
            yield
        finally:
            self._listeners = listeners

    @property
    def has_routing_listeners(self) -> bool:
        return bool(self._listeners)

    def _emit(self, layer, index, weights, outcomes, stall) -> None:
        if self._listeners:
            self._notify(layer, index.detach().cpu(), weights.detach().float().cpu(), outcomes, stall)

    def emit_step_routing(self, layers: list[int], experts: torch.Tensor, weights: torch.Tensor,
                          outcomes: dict[int, tuple[dict, float]]) -> None:
        """A captured step's routing, every MoE layer at once: experts/weights [L,T,K] on the
        device, copied to the host in one transfer; outcomes {layer: (outcomes, stall)} of
        the layers that acquired their experts (the others were resident for good)."""
        experts, weights = experts.cpu(), weights.cpu()
        for row, layer in enumerate(layers):
            layer_outcomes, stall = outcomes.get(layer, (None, 0.0))
            self._notify(layer, experts[row], weights[row], layer_outcomes, stall)

    def _notify(self, layer, experts, weights, outcomes, stall) -> None:
        if outcomes is None:  # a fully resident layer: every expert it used was a hit
            outcomes = {e: "hit" for e in experts.flatten().tolist() if e >= 0}  # (a dict: each once; no torch.unique call)
        event = RoutingEvent(layer, experts, weights, dict(outcomes), stall)
        for listener in self._listeners:
            listener(event)

    # --- decoding ----------------------------------------------------------------------
    def decoder(self, max_batch: int = 1, max_len: int | None = None, use_graphs: bool | None = None):
        """A batched decoder over a slot KV cache (CUDA graphs on CUDA): models/decoder.py."""
        from .decoder import Decoder

        max_len = max_len or min(getattr(self.model.config, "max_position_embeddings", 4096), 4096)
        return Decoder(self, max_batch, max_len, use_graphs)

    # --- generation --------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str | torch.Tensor, max_new_tokens: int = 32, **generate_kwargs) -> torch.Tensor:
        """Token ids of prompt + continuation (greedy unless sampling kwargs say otherwise)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.store.root}: store has no tokenizer; pass token ids")
            prompt = self.tokenizer(prompt, return_tensors="pt").input_ids
        generate_kwargs.setdefault("do_sample", False)
        if self._decodes_itself(generate_kwargs):
            return self._decoder_for(prompt.shape[0], prompt.shape[1] + max_new_tokens).generate(
                prompt, max_new_tokens, eos_token_ids=self._eos_token_ids(),
                pad_token_id=self.model.generation_config.pad_token_id,
                min_new_tokens=generate_kwargs.get("min_new_tokens") or 0)
        return self.model.generate(prompt.to(self.device), max_new_tokens=max_new_tokens, **generate_kwargs)

    def _decodes_itself(self, generate_kwargs: dict) -> bool:
        """Greedy generation on CUDA runs cadre's decoder (CUDA graphs); anything else (CPU,
        sampling, other generate() options) runs transformers' generate()."""
        from .decoder import unsupported_reason

        if self.config.decoder == "off" or (self.config.decoder == "auto" and self.device.type != "cuda"):
            return False
        greedy_only = set(generate_kwargs) <= {"do_sample", "min_new_tokens"} and not generate_kwargs["do_sample"]
        return greedy_only and unsupported_reason(self.model) is None

    def _decoder_for(self, batch: int, length: int):
        """The runtime's decoder, rebuilt larger when a call needs more rows or positions
        (its captured steps are kept while it suffices)."""
        current = getattr(self, "_decoder", None)
        if current is None or current.max_batch < batch or current.max_len < length:
            self._decoder = self.decoder(max_batch=batch, max_len=max(length, 256))
        return self._decoder

    def _eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def close(self) -> None:
        self.cache.close()


def make_eviction(name: str):
    return eviction_class(name)()


def plan_request(config: RuntimeConfig, device: torch.device, **server) -> PlanRequest:
    """The plan's inputs from a runtime config (the server adds its batch slots and batch tokens)."""
    host = config.host_memory if config.host_memory is not None else config.host_cache_bytes
    return PlanRequest(device=device.type, gpu_memory=config.gpu_memory, host_memory=host,
                       max_model_len=config.max_model_len, max_concurrency=config.max_concurrency,
                       cache_bytes=config.cache_bytes, cache_fraction=config.cache_fraction, **server)


def plan_for_store(store: ExpertStore, config: RuntimeConfig, dtype: torch.dtype, **server) -> MemoryPlan:
    """The memory plan for `store` under `config`, from this machine's free device and host memory."""
    return _plan(facts_from_store(store, dtype), config, **server)


def plan_for_checkpoint(checkpoint: Path, config: RuntimeConfig, **server) -> MemoryPlan:
    """The plan for a store that does not exist yet: every expert of the checkpoint's config.json."""
    import json

    try:
        model_config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{checkpoint}: cannot read config.json ({exc})") from None
    source = model_config.get("torch_dtype") or model_config.get("dtype") or "float32"
    dtype = DTYPES[config.dtype] if config.dtype else DTYPES.get(source, torch.float32)
    return _plan(facts_from_config(model_config, dtype), config, **server)


def _plan(facts, config: RuntimeConfig, **server) -> MemoryPlan:
    device = config.resolved_device()
    return plan_memory(facts, plan_request(config, device, **server), device_memory(device.type), host_memory())


def expert_bytes(store: ExpertStore, dtype: torch.dtype) -> int:
    from .cache import slot_bytes

    return slot_bytes(store, dtype)


def default_store_dir(checkpoint: Path) -> Path:
    import hashlib
    import os

    digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:12]
    base = Path(os.environ.get("CADRE_CACHE_DIR", Path.home() / ".cache" / "cadre"))
    return base / "stores" / f"{checkpoint.name}-{digest}"


def _tokenizer(root: Path):
    if not any((root / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(root)
