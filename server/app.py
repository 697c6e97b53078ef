"""The FastAPI application: state, lifespan (load, warm up, drain) and operational endpoints.

The model loads in the background after the server binds, so /health answers at once and
/ready says 503 until the model is loaded and one warm-up generation went through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import api_generate, api_openai, api_tokenize, profiling
from .config import DEFAULT_MAX_CONCURRENCY, ServerConfig
from .engine import MAX_BATCH_TOKENS, Engine, EngineConfig
from .errors import APIError, BearerAuth, BodySizeLimit, install_error_handlers
from .logs import log_event
from .metrics import Metrics
from .schemas import ErrorResponse, Health, Readiness
from .threads import in_passing_thread

DEMO_MODEL_NAME = "cadre-demo"


@dataclass
class AppState:
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    runtime: object | None = None
    plan: object | None = None  # models.memory_plan.MemoryPlan, once computed
    status: str = "loading"  # loading | ready | failed | stopping
    detail: str | None = None
    load_failed: bool = False  # kept through "stopping": the process exits non-zero
    on_load_failure: object | None = None  # () -> None, e.g. stop the HTTP server (python -m server)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        c = self.config
        if c.served_model_name:
            return c.served_model_name
        source = c.store or c.model
        return Path(source).resolve().name if source else DEMO_MODEL_NAME

    @property
    def max_model_len(self) -> int | None:
        return self.engine.config.max_model_len if self.engine else None

    def require_engine(self) -> Engine:
        if self.status != "ready" or self.engine is None:
            self.metrics.rejections.labels("not_ready" if self.status != "stopping" else "shutting_down").inc()
            raise APIError(503, f"model is not ready ({self.status})", code="not_ready",
                           headers={"Retry-After": "5"})
        return self.engine


def runtime_config(config: ServerConfig, plan=None):
    from models import RuntimeConfig

    return RuntimeConfig(device=config.device, cache_bytes=config.cache_bytes, cache_fraction=config.cache_fraction,
                         dtype=resolved_dtype(config), routing=config.routing, eviction=config.eviction,
                         gpu_memory=config.gpu_memory, host_memory=config.host_memory,
                         max_model_len=config.max_model_len, max_concurrency=config.max_concurrency, plan=plan,
                         compile_step=config.compile_step)


def memory_plan(config: ServerConfig, runtime=None):
    """The server's memory plan (models.memory_plan), computed before loading: for --store, --model
    (its config.json, every expert) or the demo; for an already loaded `runtime`, around its cache.
    With the decoder engine every request holds a KV row of max_model_len, so the plan sizes rows."""
    from models.footprint import hf_config
    from models.runtime import plan_for_checkpoint, plan_for_store

    rt_config = runtime_config(config)
    device = runtime.device.type if runtime is not None else rt_config.resolved_device().type
    server = {"default_concurrency": DEFAULT_MAX_CONCURRENCY, "max_batch_tokens": MAX_BATCH_TOKENS}
    if runtime is not None:
        from dataclasses import replace

        server["slot_rows"] = uses_decoder(config.engine, device, runtime.model.config)
        fixed = replace(rt_config, device=device, cache_bytes=runtime.cache.capacity_bytes, cache_fraction=None)
        return plan_for_store(runtime.store, fixed, runtime.cache.dtype, **server)
    if config.store:
        from extractor.store import ExpertStore

        store = ExpertStore.open(config.store)
        server["slot_rows"] = uses_decoder(config.engine, device, hf_config(store.config))
        return plan_for_store(store, rt_config, plan_dtype(rt_config, store.dtype), **server)
    from models.demo import CHECKPOINT_DIR

    checkpoint = Path(config.model) if config.model else CHECKPOINT_DIR
    server["slot_rows"] = uses_decoder(config.engine, device,
                                       hf_config(json.loads((checkpoint / "config.json").read_text())))
    return plan_for_checkpoint(checkpoint, rt_config, **server)


def plan_dtype(rt_config, store_dtype):
    from models.runtime import DTYPES

    return DTYPES[rt_config.dtype] if rt_config.dtype else store_dtype


def resolved_dtype(config: ServerConfig) -> str | None:
    """None = the store's dtype. CPU gets float32: bf16/fp16 matmuls there are slower, not faster
    (transformers' own generate() on the demo model: see README, "Server")."""
    if config.dtype != "auto":
        return config.dtype
    import torch

    on_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return None if on_cuda else "float32"


def load_runtime(config: ServerConfig, plan):
    """The runtime for --store, --model or (neither) the built-in demo model, sized by `plan`."""
    from models import Runtime

    runtime_cfg = runtime_config(config, plan)
    if config.store:
        return Runtime.from_store(config.store, runtime_cfg)
    if config.model:
        return Runtime.from_checkpoint(config.model, runtime_cfg)
    from models.demo import ensure_demo_store

    return Runtime.from_store(ensure_demo_store(), runtime_cfg)


def adopt_plan(state: AppState, plan) -> None:
    """Keep the plan, log it once (one structured line) and export it as gauges."""
    state.plan = plan
    log_event("memory_plan", summary=plan.describe(), **plan.as_fields())
    state.metrics.attach_plan(plan)


def engine_class(runtime, choice: str) -> type[Engine]:
    """The engine that runs the forwards: cadre's decoder (CUDA graphs) on a GPU where the
    model's attention allows it, transformers' continuous batching otherwise (README, Server)."""
    from .decode_engine import DecoderEngine

    return DecoderEngine if uses_decoder(choice, runtime.device.type, runtime.model.config) else Engine


def uses_decoder(choice: str, device: str, model_config) -> bool:
    """Whether engine_class picks the decoder; known from the config alone, so the plan (made
    before loading) sizes the KV the way that engine holds it."""
    from types import SimpleNamespace

    from models.decoder import unsupported_reason

    reason = unsupported_reason(SimpleNamespace(config=model_config))  # it reads model.config only
    if choice == "decoder" and reason is not None:
        raise ValueError(f"--engine decoder: {reason}")
    return choice == "decoder" or (choice == "auto" and device == "cuda" and reason is None)


async def bring_up(state: AppState, runtime=None) -> None:
    """Plan (unless planned before), load (unless given a runtime), start the batching loop, warm
    up; never raises: a failure turns /ready and /health to 503 with the reason."""
    try:
        started = time.perf_counter()
        if state.plan is None:
            adopt_plan(state, await in_passing_thread(memory_plan, state.config, runtime))
        plan = state.plan
        state.runtime = runtime or await in_passing_thread(load_runtime, state.config, plan)
        c = state.config
        engine_cls = engine_class(state.runtime, c.engine)
        engine = engine_cls(state.runtime, EngineConfig(max_concurrency=plan.max_concurrency, max_queue=c.max_queue,
                                                        batching=c.batching, max_model_len=plan.max_model_len,
                                                        kv_tokens=plan.kv_tokens, stall_timeout_s=c.stall_timeout),
                            state.metrics)
        await in_passing_thread(engine.start)
        state.metrics.attach_runtime(engine.recorder, state.runtime.cache, engine.kv_pages_in_use)
        state.engine = engine
        await engine.warmup()
        state.status = "ready"
        log_event("ready", model=state.model_name, engine=engine.kind, batching=engine.batching,
                  max_model_len=engine.config.max_model_len,
                  seconds=round(time.perf_counter() - started, 2))
    except Exception as exc:  # said on /ready and /health; `python -m server` then exits non-zero
        state.status, state.detail, state.load_failed = "failed", f"{type(exc).__name__}: {exc}", True
        log_event("load_failed", level=logging.ERROR, error=state.detail)
        if state.on_load_failure is not None:
            state.on_load_failure()


def create_app(config: ServerConfig, runtime=None, plan=None) -> FastAPI:
    """The app; `runtime` (already loaded) skips loading from config (tests, embedding); `plan`
    (python -m server computes it before loading, to refuse a budget with exit 2) skips planning."""
    state = AppState(config)
    if plan is not None:
        adopt_plan(state, plan)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(bring_up(state, runtime))
        try:
            yield
        finally:
            state.status = "stopping"
            await asyncio.gather(loading, return_exceptions=True)
            if state.engine is not None:
                await state.engine.shutdown(config.shutdown_timeout)
            log_event("stopped", model=state.model_name)

    app = FastAPI(title="cadre", version="0.1.0", lifespan=lifespan,
                  description="Serve Mixture-of-Experts models from an expert store: text generation with "
                              "per-token routing traces, OpenAI-compatible endpoints, Prometheus metrics.")
    app.state.cadre = state
    install_error_handlers(app)
    app.include_router(api_generate.router)
    app.include_router(api_openai.router)
    app.include_router(api_tokenize.router)
    add_ops_routes(app, state)
    if config.enable_profiling:
        add_profile_route(app)
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key, exempt=config.auth_exempt)
    return app


def add_profile_route(app: FastAPI) -> None:
    @app.post("/debug/profile", tags=["ops"], response_class=Response,
              summary="Sample every server thread for `seconds` (--enable-profiling): collapsed stacks, text",
              responses={400: {"model": ErrorResponse}})
    async def profile(seconds: float = 10.0):
        if not 0 < seconds <= profiling.MAX_SECONDS:
            raise APIError(400, f"seconds must be in (0, {profiling.MAX_SECONDS:g}], got {seconds:g}", param="seconds")
        stacks = await asyncio.to_thread(profiling.sample_stacks, seconds)
        return Response(profiling.render(stacks), media_type="text/plain")


def add_ops_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health", response_model=Health, response_model_exclude_none=True, tags=["ops"], summary="Liveness",
             responses={503: {"model": Health}})
    async def health():
        engine = state.engine
        if state.status == "failed":
            return JSONResponse({"status": "unhealthy", "detail": state.detail}, status_code=503)
        if engine is not None and state.status == "ready" and not engine.is_alive:
            return JSONResponse({"status": "unhealthy", "detail": "generation loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", response_model=Readiness, tags=["ops"],
             summary="Readiness: 503 until loaded and warmed up, and whenever the engine cannot make progress",
             responses={503: {"model": Readiness}})
    async def ready():
        status, detail = state.status, state.detail
        problem = state.engine.health_problem() if status == "ready" and state.engine is not None else None
        if problem is not None:
            status, detail = "stalled", problem
        body = {"status": status, "model": state.model_name, "detail": detail}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/experts", tags=["ops"], summary="Expert residency, usage and routing analytics",
             responses={503: {"model": ErrorResponse}})
    async def experts():
        engine = state.require_engine()
        return await in_passing_thread(experts_report, state, engine, torch_threads=1)


def experts_report(state: AppState, engine: Engine) -> dict:
    runtime, recorder = state.runtime, engine.recorder
    store = runtime.store
    resident: dict[int, list[int]] = {}
    for layer, expert in runtime.cache.resident():
        resident.setdefault(layer, []).append(expert)
    activations = recorder.activations.tolist()
    layers = []
    for row, layer in enumerate(recorder.moe_layers):
        queries, hits = int(recorder.queries[row]), int(recorder.hits[row])
        layers.append({"layer": layer, "present": store.experts_present(layer),
                       "resident": sorted(resident.get(layer, [])), "activations": activations[row],
                       "cache_queries": queries, "cache_hits": hits})
    stats = runtime.cache.stats()
    cache = {"queries": stats.queries, "hits": stats.hits, "misses": stats.misses, "hit_rate": stats.hit_rate,
             "loads": dict(stats.loads), "evictions": stats.evictions, "bytes": stats.bytes,
             "capacity_bytes": stats.capacity_bytes, "load_seconds": stats.load_seconds,
             "prefetch": dict(stats.prefetch)}
    analytics = recorder.analytics({layer: store.experts_present(layer) for layer in recorder.moe_layers})
    host = runtime.cache.host.stats() if getattr(runtime.cache, "host", None) is not None else None
    plan = {**state.plan.as_fields(), "parts": state.plan.parts()} if state.plan is not None else None
    return {"model": state.model_name, "num_experts": store.num_experts, "top_k": store.top_k,
            "layers": layers, "cache": cache, "routing": analytics, "memory_plan": plan,
            "host_tier": asdict(host) if host is not None else None}
