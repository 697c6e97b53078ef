"""The Ray Serve application: CadreIngress -> (request router) -> CadreReplica x N.

`build_app(RayConfig)` is what `python -m server.ray` runs; `app_builder(args)` is the
same for `serve run server.ray.app:app_builder key=value ...` and for a RayService's
serveConfigV2 (`import_path: server.ray.app:app_builder`), its args being the flags of
`python -m server.ray` without the dashes (e.g. `cache-fraction: "0.25"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ServerConfig

ADMISSION_SLACK = 2  # requests a replica may hold beyond its batch: the rest wait where any replica can take them


@dataclass(frozen=True)
class RayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    replicas: int = 2  # fixed count, unless max_replicas turns autoscaling on
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target per replica (default: half a batch)
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0  # window over which queue depth is averaged
    request_router: str = "affinity"  # affinity | power-of-two | round-robin
    affinity_profile: str | None = None
    affinity_imbalance: int = 0  # router.affinity.DEFAULT_IMBALANCE
    routing_stats_period_s: float = 1.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    torch_threads: int | None = None  # None: as many as cpus_per_replica (at least 1)
    app_name: str = "cadre"

    def __post_init__(self):
        if self.replicas < 1 or self.min_replicas < 0:
            raise ValueError("--replicas must be >= 1 and --min-replicas >= 0")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"--max-replicas ({self.max_replicas}) must be >= max(1, --min-replicas)")
        if self.routing_stats_period_s <= 0:
            raise ValueError("--routing-stats-period-s must be > 0")

    @property
    def autoscaling(self) -> dict | None:
        if self.max_replicas is None:
            return None
        target = self.target_ongoing_requests or max(1.0, self.server.batch_slots / 2)
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": min(max(self.min_replicas, 1), self.max_replicas),
                "target_ongoing_requests": target, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s, "look_back_period_s": self.look_back_period_s,
                # Serve wants replicas to report more often than once per window (it warns, and will refuse)
                "metrics_interval_s": min(10.0, self.look_back_period_s / 2)}


def tokenizer_dir(server: ServerConfig) -> str:
    """Where the served model's tokenizer is (the profile's token ids are this tokenizer's)."""
    if server.store or server.model:
        return server.store or server.model
    from models.demo import CHECKPOINT_DIR

    return str(CHECKPOINT_DIR)


def replica_options(config: RayConfig) -> dict:
    from ray.serve.config import RequestRouterConfig

    from .request_router import ROUTERS

    s = config.server
    router = RequestRouterConfig(request_router_class=ROUTERS[config.request_router],
                                 request_router_kwargs={"imbalance": config.affinity_imbalance},
                                 request_routing_stats_period_s=config.routing_stats_period_s)
    scaling = {"autoscaling_config": config.autoscaling} if config.autoscaling else {"num_replicas": config.replicas}
    return {"name": "CadreReplica", **scaling,
            "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
            "max_ongoing_requests": s.batch_slots + ADMISSION_SLACK, "max_queued_requests": s.max_queue,
            "graceful_shutdown_timeout_s": s.shutdown_timeout, "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 5.0, "request_router_config": router}


def build_app(config: RayConfig):
    from ray import serve

    from . import check_ray_version
    from .ingress import CadreIngress, IngressConfig
    from .replica import CadreReplica

    check_ray_version()
    s = config.server
    threads = config.torch_threads or max(1, int(config.cpus_per_replica))
    replica = serve.deployment(CadreReplica).options(**replica_options(config))
    ingress_config = IngressConfig(config.app_name, config.affinity_profile, tokenizer_dir(s), s.max_body_bytes,
                                   s.api_key, s.auth_exempt)
    ingress = serve.deployment(serve.ingress()(CadreIngress)).options(
        name="CadreIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * (s.batch_slots + s.max_queue)))
    return ingress.bind(replica.bind(s, threads), ingress_config)


def app_builder(args: dict):
    """`serve run` / serveConfigV2 entry: args are python -m server.ray's flags without dashes."""
    from .cli import parse_ray_config

    argv = []
    for key, value in (args or {}).items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_app(parse_ray_config(argv))


def with_default_profile(config: RayConfig) -> RayConfig:
    """The demo model's token profile when affinity routing has none (built once, cached)."""
    import dataclasses
    import logging

    if config.request_router != "affinity" or config.affinity_profile:
        return config
    if config.server.store or config.server.model:
        from ..logs import log_event

        log_event("no_affinity_profile", level=logging.WARNING,
                  detail="without --affinity-profile the affinity router places by queue length only")
        return config
    return dataclasses.replace(config, affinity_profile=str(ensure_demo_profile()))


def ensure_demo_profile():
    """$CADRE_CACHE_DIR/demo-token-profile-<config sha>.safetensors, from the demo's held-out text."""
    from extractor.store import sha256_file
    from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT, default_store_dir, ensure_demo_store
    from router.token_profile import build_profile

    digest = sha256_file(CHECKPOINT_DIR / "config.json")[:12]
    path = default_store_dir().parent / f"demo-token-profile-{digest}.safetensors"
    if not path.exists():
        profile = build_profile(ensure_demo_store(), HELDOUT_TEST_TEXT.read_text(), max_tokens=DEMO_PROFILE_TOKENS)
        partial = path.with_suffix(".partial")
        profile.save(partial)
        partial.replace(path)  # atomic: a concurrent start never reads half a file
    return path


DEMO_PROFILE_TOKENS = 32_768
