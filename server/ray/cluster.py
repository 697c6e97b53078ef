"""A local Ray cluster for cadre: loopback node address, no dashboard, no usage stats.

Ray's own gRPC services still bind every interface (no ray.init option narrows them);
they require the cluster's auth token (on by default in Ray 2.60), and the node
advertises 127.0.0.1 only. Serve's HTTP proxy binds --host (127.0.0.1 by default).
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def start_local_cluster(num_cpus: int, address: str | None = None, num_gpus: int | None = None) -> None:
    """ray.init: join `address`, or start a node with `num_cpus` logical CPUs on loopback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before ray is imported: it reads this at import
    import ray

    if address:
        ray.init(address=address)
        return
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address=LOOPBACK,
             log_to_driver=os.environ.get("CADRE_RAY_LOG_TO_DRIVER", "0") == "1")
