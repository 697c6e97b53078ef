"""`python -m server`: flags, each also settable as CADRE_<FLAG> (e.g. CADRE_PORT=9000).

Precedence: command line > environment > default. A bad flag or variable exits 2 with
one line on stderr naming it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from .config import ServerConfig

PROG = "python -m server"
ENV_PREFIX = "CADRE_"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one stderr line (the project's CLI contract)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise ValueError(text)
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


def csv_paths(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser(prog: str = PROG) -> OneLineParser:
    p = OneLineParser(prog=prog, description="Serve a Mixture-of-Experts model from an expert store over HTTP.",
                      epilog=f"Every flag can also be set from the environment as {ENV_PREFIX}<FLAG_NAME>, "
                             "e.g. CADRE_PORT=9000 or CADRE_API_KEY=secret.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--store", help="expert store directory (python -m extractor output)")
    source.add_argument("--model", help="Hugging Face checkpoint directory, or Hub id org/name[@revision] "
                        "(downloaded first); extracted to a cached store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=non_negative_int, default=8000)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype (auto: float32 on CPU, the store's dtype on CUDA)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cache-bytes", type=positive_int, help="expert cache budget in bytes")
    budget.add_argument("--cache-fraction", type=float, help="expert cache budget as a fraction of the store's experts")
    p.add_argument("--routing", default="exact",
                   help="routing policy: exact (the model's own top-k, default) or a lossy one of router.policy")
    p.add_argument("--eviction", default=ServerConfig.eviction,
                   help="expert cache eviction: layer-lru (default: LRU within fair per-layer shares, so a batch "
                        "whose experts exceed the budget does not evict what the next layers need), lru or salience")
    p.add_argument("--gpu-memory", help="device memory budget for the memory plan: bytes, 24GiB, or a fraction "
                        "of the device's free memory such as 0.9 (default: free memory less a safety margin)")
    p.add_argument("--host-memory", help="pinned host tier budget on a GPU: bytes, 32GiB, or a fraction of the "
                        "available RAM (default: half of the available RAM)")
    p.add_argument("--engine", choices=("auto", "decoder", "continuous-batching"), default="auto",
                   help="decoder: cadre's slot-cache decoder, decode steps replayed as CUDA graphs on a GPU; "
                        "continuous-batching: transformers' manager; auto (default): decoder on CUDA where "
                        "the model's attention allows it, continuous batching otherwise")
    p.add_argument("--compile-step", action="store_true",
                   help="decoder engine, budgets holding every expert: torch.compile each decode step's forward "
                        "before capturing it (inductor's fused kernels; compiles once per batch size at start)")
    p.add_argument("--max-concurrency", type=positive_int,
                   help="requests decoded together in one batch (default 16; they share the KV tokens of the "
                        "memory plan)")
    p.add_argument("--batching", choices=("auto", "continuous", "static"), default="auto",
                   help="auto (default): transformers' continuous batching where it supports the model's attention, "
                        "else static batches through generate() (DeepSeek's MLA, linear-attention layers)")
    p.add_argument("--max-queue", type=non_negative_int, default=64,
                   help="requests that may wait for a slot; beyond this the server answers 503 + Retry-After")
    p.add_argument("--max-model-len", type=positive_int,
                   help="context window to enforce (default: the model's, cut to what the plan's KV holds)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but --auth-exempt ones")
    p.add_argument("--auth-exempt", type=csv_paths, default=ServerConfig.auth_exempt,
                   help="comma-separated paths served without the API key (default: /health,/ready,/metrics; "
                        "'' protects everything)")
    p.add_argument("--max-body-bytes", type=positive_int, default=ServerConfig.max_body_bytes,
                   help="largest request body accepted (413 beyond)")
    p.add_argument("--served-model-name", help="model id in /v1/models and OpenAI requests (default: store name)")
    p.add_argument("--shutdown-timeout", type=float, default=ServerConfig.shutdown_timeout,
                   help="seconds in-flight requests get to finish on shutdown before they are cancelled")
    p.add_argument("--stall-timeout", type=float, default=ServerConfig.stall_timeout,
                   help="seconds without a generation step, while requests are in flight, after which /ready "
                        "answers 503 (the engine is stuck)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--enable-profiling", action="store_true",
                   help="serve POST /debug/profile?seconds=N: where every server thread spent those seconds, "
                        "as collapsed stacks (flamegraph.pl, speedscope); off by default")
    return p


def env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ) -> None:
    """Use CADRE_<FLAG> as each flag's default, converted and checked like the flag itself."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        raw = environ.get(env_name(action))
        if raw is None or raw == "":  # compose passes unset variables through as empty
            continue
        try:
            value = action.type(raw) if action.type else raw
        except (TypeError, ValueError):
            parser.error(f"{env_name(action)}: invalid value {raw!r} for {action.option_strings[0]}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{env_name(action)}: {raw!r} is not one of {', '.join(map(str, action.choices))}")
        action.default = value


def check_policies(parser: argparse.ArgumentParser, routing: str, eviction: str) -> None:
    if (routing, eviction) == ("exact", ServerConfig.eviction):
        return  # the defaults need no import of the router (and torch) to check
    from router.eviction import EVICTION_POLICIES
    from router.policy import POLICIES

    if routing not in POLICIES:
        parser.error(f"--routing {routing}: unknown routing mode (known: {', '.join(sorted(POLICIES))})")
    evictions = {"lru", *EVICTION_POLICIES}
    if eviction not in evictions:
        parser.error(f"--eviction {eviction}: unknown eviction policy (known: {', '.join(sorted(evictions))})")


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.store and not (Path(args.store) / "manifest.json").is_file():
        parser.error(f"--store {args.store}: not an expert store (no manifest.json)")
    from extractor.hub import is_hub_id

    if args.model and not is_hub_id(args.model) and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a Hugging Face checkpoint (no config.json) nor a Hub id org/name")


def parse_config(argv: list[str] | None = None, environ=None) -> ServerConfig:
    parser = build_parser()
    apply_env_defaults(parser, os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    check_paths(parser, args)
    check_policies(parser, args.routing, args.eviction)
    try:
        return ServerConfig(**vars(args))
    except ValueError as exc:  # cross-flag checks (e.g. a flag and the other group's env var)
        parser.error(str(exc))


def plan_or_exit(config: ServerConfig):
    """The memory plan, before anything loads; a budget that cannot hold it exits 2 with one line."""
    from .app import memory_plan

    try:
        return memory_plan(config)
    except (ValueError, RuntimeError) as exc:  # PlanError, FootprintError, StoreError
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        sys.exit(2)


def bind_listener(parser: argparse.ArgumentParser, host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a busy port fails in a second, not after the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        parser.error(f"--host {host}: cannot resolve ({exc.strerror})")
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        parser.error(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})")
    sock.set_inheritable(True)
    return sock


EXIT_LOAD_FAILED = 1  # the model failed to load (logged as event "load_failed"); 2 is bad flags


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    listener = bind_listener(build_parser(), config.host, config.port)
    import uvicorn

    from .app import create_app
    from .logs import configure_logging

    configure_logging(config.log_level)
    app = create_app(config, plan=plan_or_exit(config))
    # uvicorn finishes in-flight requests for shutdown_timeout seconds on SIGTERM/SIGINT,
    # then cancels them (a cancelled stream cancels its generation); the app's lifespan
    # then stops the engine. Access logs are off: the app logs one line per request.
    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, access_log=False,
                                           timeout_graceful_shutdown=config.shutdown_timeout, log_config=None))
    # A model that cannot load will not load by waiting: stop, so an orchestrator restarts
    # or reports the process instead of routing to a server that can only answer 503.
    state = app.state.cadre
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[listener])
    return EXIT_LOAD_FAILED if state.load_failed else 0
