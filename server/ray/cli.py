"""`python -m server.ray`: python -m server's flags, plus the Ray Serve ones; each also
settable as CADRE_<FLAG>. Starts a local Ray cluster on loopback (or joins --ray-address),
deploys the application (app.py) behind Serve's HTTP proxy on --host:--port, and runs
until SIGINT/SIGTERM, when Serve drains the replicas. A bad flag exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..cli import (OneLineParser, apply_env_defaults, build_parser, check_paths, check_policies, non_negative_float,
                   non_negative_int, positive_float, positive_int)
from ..config import ServerConfig
from .app import RayConfig

PROG = "python -m server.ray"
ROUTER_NAMES = ("affinity", "power-of-two", "round-robin")
LAUNCH_FLAGS = ("ray_address", "ray_num_cpus")  # how to start, not what to deploy


def build_ray_parser() -> OneLineParser:
    p = build_parser(PROG)
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--replicas", type=positive_int, default=RayConfig.replicas, help="replicas (without autoscaling)")
    g.add_argument("--min-replicas", type=non_negative_int, default=RayConfig.min_replicas)
    g.add_argument("--max-replicas", type=positive_int,
                   help="autoscale between --min-replicas and this many replicas on queue depth")
    g.add_argument("--target-ongoing-requests", type=positive_float,
                   help="autoscaling target of requests per replica (default: half of --max-concurrency)")
    g.add_argument("--upscale-delay-s", type=non_negative_float, default=RayConfig.upscale_delay_s)
    g.add_argument("--downscale-delay-s", type=non_negative_float, default=RayConfig.downscale_delay_s)
    g.add_argument("--look-back-period-s", type=positive_float, default=RayConfig.look_back_period_s,
                   help="autoscaling: seconds over which queue depth is averaged")
    g.add_argument("--request-router", choices=ROUTER_NAMES, default=RayConfig.request_router,
                   help="affinity (expert-cache affinity, queue-length fallback), power-of-two (Ray's default) "
                        "or round-robin")
    g.add_argument("--affinity-profile", help="token profile (python -m router.token_profile) that predicts a "
                                              "prompt's experts (default for the demo model: built once from its "
                                              "held-out text)")
    g.add_argument("--affinity-imbalance", type=non_negative_int, default=RayConfig.affinity_imbalance,
                   help="requests by which the favoured replica's queue may exceed the shortest before the "
                        "shortest wins")
    g.add_argument("--routing-stats-period-s", type=positive_float, default=RayConfig.routing_stats_period_s,
                   help="how often replicas publish what their expert caches hold")
    g.add_argument("--cpus-per-replica", type=non_negative_float, default=RayConfig.cpus_per_replica)
    g.add_argument("--gpus-per-replica", type=non_negative_float,
                   help="default: 1 where CUDA is available and --device is not cpu, else 0")
    g.add_argument("--torch-threads", type=positive_int, help="per replica (default: --cpus-per-replica, >= 1)")
    g.add_argument("--app-name", default=RayConfig.app_name)
    g.add_argument("--ray-address", help="join this Ray cluster (default: start a local one on loopback)")
    g.add_argument("--ray-num-cpus", type=positive_int, help="logical CPUs of the local cluster "
                                                             "(default: enough for the replicas)")
    return p


def parse_ray_args(argv: list[str] | None = None, environ=None) -> tuple[RayConfig, argparse.Namespace]:
    parser = build_ray_parser()
    apply_env_defaults(parser, os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    check_paths(parser, args)
    check_policies(parser, args.routing, args.eviction)
    if args.affinity_profile and not os.path.isfile(args.affinity_profile):
        parser.error(f"--affinity-profile {args.affinity_profile}: no such file")
    values = vars(args)
    launch = argparse.Namespace(**{k: values.pop(k) for k in LAUNCH_FLAGS})
    ray_fields = {k: values.pop(k) for k in list(values) if k in RayConfig.__dataclass_fields__}
    try:
        server = ServerConfig(**values)
        if ray_fields["gpus_per_replica"] is None:
            ray_fields["gpus_per_replica"] = default_gpus(server)
        return RayConfig(server=server, **ray_fields), launch
    except ValueError as exc:
        parser.error(str(exc))


def parse_ray_config(argv: list[str] | None = None, environ=None) -> RayConfig:
    return parse_ray_args(argv, environ)[0]


def default_gpus(server: ServerConfig) -> float:
    if server.device == "cpu":
        return 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def main(argv: list[str] | None = None) -> int:
    config, launch = parse_ray_args(argv)
    from . import RayVersionError, check_ray_version

    try:
        check_ray_version()
    except RayVersionError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    from ..logs import configure_logging, log_event
    from .app import build_app, with_default_profile
    from .cluster import start_local_cluster

    configure_logging(config.server.log_level)
    config = with_default_profile(config)
    import ray
    from ray import serve

    start_local_cluster(launch.ray_num_cpus or local_cpus(config), address=launch.ray_address)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    log_event("serving", url=f"http://{config.server.host}:{config.server.port}", router=config.request_router,
              replicas=config.replicas if config.max_replicas is None
              else f"{config.min_replicas}-{config.max_replicas}")
    wait_for_stop_signal()
    serve.shutdown()  # drains every replica: in-flight requests get --shutdown-timeout to finish
    ray.shutdown()
    return 0


def wait_for_stop_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def local_cpus(config: RayConfig) -> int:
    replicas = config.max_replicas or config.replicas
    return max(1, int(replicas * config.cpus_per_replica + 0.999))
