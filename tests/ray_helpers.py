"""A local Ray cluster with Serve for the tests of cadre on Ray (server/ray).

One cluster per test session (starting Ray costs seconds); each test module deploys the
application it needs with `deploy()`, which replaces the previous one. Loopback only: the
node advertises 127.0.0.1, Serve's proxy binds 127.0.0.1, no dashboard, no usage stats.
The model is the demo model (2 replicas, CPU, one torch thread each): its store and token
profile are built once into the session's temporary directory.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

APP = "cadre"
LOGICAL_CPUS = 4  # replicas ask for one each: room to scale to 3 on a 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServe:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.closed = False
        self.deployed = None  # (config, replicas) of the application running now

    def __enter__(self) -> "RayServe":
        from models.demo import HELDOUT_TEST_TEXT, ensure_demo_store
        from router.token_profile import build_profile
        from server.ray.cluster import start_local_cluster

        self.store = ensure_demo_store(self.workdir / "demo-store")
        self.profile = self.workdir / "profile.safetensors"
        build_profile(self.store, HELDOUT_TEST_TEXT.read_text(), max_tokens=4096).save(self.profile)
        start_local_cluster(LOGICAL_CPUS)
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop Serve and Ray (once: conftest stops them after their last test, the fixture at exit)."""
        if self.closed:
            return
        import ray
        from ray import serve

        self.closed = True
        serve.shutdown()
        ray.shutdown()

    def config(self, **overrides):
        from server.config import ServerConfig
        from server.ray.app import RayConfig

        server = {"store": str(self.store), "device": "cpu", "cache_fraction": 0.25, "max_concurrency": 4,
                  "max_queue": 16, "shutdown_timeout": 30.0, "log_level": "warning", **overrides.pop("server", {})}
        ray = {"replicas": 2, "affinity_profile": str(self.profile), "cpus_per_replica": 1.0, "torch_threads": 1,
               "routing_stats_period_s": 0.5, "app_name": APP, **overrides}
        return RayConfig(server=ServerConfig(**server), **ray)

    def deploy(self, config, timeout: float = 180, replicas: int | None = None) -> None:
        """Deploy (replacing what ran) and wait until `replicas` (default config.replicas) answer.
        The same config as the application running now is not redeployed (a rolling restart of every
        replica, ~12 s here): test modules wanting the default application share one."""
        from ray import serve

        from server.ray.app import build_app

        wanted = (config, replicas or config.replicas)
        if self.deployed != wanted:
            self.deployed = None  # a failed deploy leaves no application to share
            serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
        self.wait_for_replicas(wanted[1], timeout)
        self.deployed = wanted

    def wait_for_replicas(self, count: int, timeout: float = 180) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            ids = self.replica_ids()
            if len(ids) == count:
                return ids
            assert time.monotonic() < deadline, f"{len(ids)} replicas, waiting for {count}"
            time.sleep(0.2)

    def scrape(self) -> list:
        """Metric families of the ingress's /metrics ([] while the app is not up)."""
        try:
            response = httpx.get(f"{self.url}/metrics", timeout=30)
        except httpx.TransportError:
            return []
        return list(text_string_to_metric_families(response.text)) if response.status_code == 200 else []

    def replica_ids(self) -> list[str]:
        return sorted({s.labels["replica"] for f in self.scrape() if f.name == "cadre_requests_running"
                       for s in f.samples})

    def total(self, sample_name: str) -> float:
        return sum(s.value for f in self.scrape() for s in f.samples if s.name == sample_name)

    def kill(self, replica_id: str) -> None:
        import ray

        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#CadreReplica#{replica_id}", namespace="serve"), no_restart=True)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)
