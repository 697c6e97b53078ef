"""The server's one validated configuration object, built once from flags and env."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_CONCURRENCY = 16  # batch slots when --max-concurrency is not given (they share the plan's KV tokens)


@dataclass(frozen=True)
class ServerConfig:
    store: str | None = None  # an extracted expert store ...
    model: str | None = None  # ... or a HF checkpoint (extracted to a cached store); neither = demo
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU (its half-precision matmuls are slower), the store's on CUDA
    cache_bytes: int | None = None
    cache_fraction: float | None = None
    routing: str = "exact"
    eviction: str = "layer-lru"  # a batch's experts can exceed the budget: fair per-layer shares (README, Router)
    gpu_memory: str | None = None  # device budget: bytes, 24GiB, or a fraction of free memory (models.memory_plan)
    host_memory: str | None = None  # pinned host tier budget on a GPU: bytes, 32GiB, or a fraction of available RAM
    engine: str = "auto"  # auto | decoder | continuous-batching (server.app.engine_class)
    compile_step: bool = False  # decoder engine: torch.compile each decode step (models.decoder)
    max_concurrency: int | None = None  # requests decoded together; None = DEFAULT_MAX_CONCURRENCY
    batching: str = "auto"  # auto | continuous | static (server.engine.EngineConfig)
    max_queue: int = 64  # requests waiting for a slot; beyond this: 503 + Retry-After
    max_model_len: int | None = None  # None: the memory plan's choice (at most the model's context window)
    api_key: str | None = None
    auth_exempt: tuple[str, ...] = ("/health", "/ready", "/metrics")
    max_body_bytes: int = 1 << 20
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    stall_timeout: float = 60.0  # /ready is 503 after this long without a step while work is in flight
    log_level: str = "info"
    enable_profiling: bool = False  # POST /debug/profile samples the server's threads (server.profiling)

    @property
    def batch_slots(self) -> int:
        """--max-concurrency, or the default the memory plan starts from (the plan may choose
        fewer slots for the decoder engine: Engine.config.max_concurrency is what runs)."""
        return self.max_concurrency or DEFAULT_MAX_CONCURRENCY

    def __post_init__(self):
        if self.store and self.model:
            raise ValueError("give --store or --model, not both")
        if self.cache_bytes is not None and self.cache_fraction is not None:
            raise ValueError("give --cache-bytes or --cache-fraction, not both")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ValueError(f"--cache-bytes must be positive, got {self.cache_bytes}")
        if self.cache_fraction is not None and not 0 < self.cache_fraction <= 1:
            raise ValueError(f"--cache-fraction must be in (0, 1], got {self.cache_fraction}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_concurrency", "max_body_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
        if not self.stall_timeout > 0:
            raise ValueError(f"--stall-timeout must be > 0, got {self.stall_timeout}")
