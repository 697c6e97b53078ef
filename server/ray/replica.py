"""CadreReplica: one cadre server (server.app.create_app) inside a Ray Serve replica.

The FastAPI app runs in the replica's event loop: its lifespan loads the runtime and
warms up in the constructor, so Serve routes to a replica only once it is ready; the
ingress's forwarded requests are replayed into it (forwarding.replay), so every endpoint,
stream, error and metric is the server's own. On scale-down Serve stops routing to the
replica, waits for its in-flight requests (graceful_shutdown_timeout_s, the server's
--shutdown-timeout), then calls __del__, which runs the app's shutdown.
"""

from __future__ import annotations

import asyncio

from router.affinity import summarize

from ..app import create_app
from ..config import ServerConfig
from .forwarding import ForwardedRequest, replay

READY_POLL_S = 0.05


class CadreReplica:
    async def __init__(self, config: ServerConfig, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)  # replicas sharing a machine share its cores
        from ..logs import configure_logging

        configure_logging(config.log_level)
        self.app = create_app(config)
        self.state = self.app.state.cadre
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        while self.state.status == "loading":
            await asyncio.sleep(READY_POLL_S)
        if self.state.status != "ready":
            raise RuntimeError(f"cadre replica did not come up: {self.state.detail}")

    async def http(self, request: ForwardedRequest):
        """The app's ASGI messages for `request`, in batches (a streaming handle call)."""
        async for batch in replay(self.app, request):
            yield batch

    async def record_routing_stats(self) -> dict:
        """What the expert-affinity router weighs: the cache's residents and recent usage."""
        runtime, engine = self.state.runtime, self.state.engine
        if engine is None:
            return {}
        recorder = engine.recorder
        summary = summarize(runtime.cache.resident(), recorder.usage_counts.tolist(), recorder.moe_layers,
                            runtime.cache.num_slots)
        return {**summary.to_stats(), "running": engine.num_running, "waiting": engine.num_waiting}

    def check_health(self) -> None:
        engine = self.state.engine
        if self.state.status == "failed" or (engine is not None and not engine.is_alive):
            raise RuntimeError(f"cadre replica unhealthy: {self.state.detail or 'generation loop stopped'}")

    async def __del__(self):
        await self._lifespan.__aexit__(None, None, None)
