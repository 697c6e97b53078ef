"""CadreIngress: Ray Serve's HTTP entry for cadre, in front of the CadreReplica deployment.

Ray's proxy routes by path, not by body, so the request router of the replicas runs here,
in the handle this deployment forwards through: the ingress reads the body, predicts the
prompt's experts (prediction.py), and forwards the request (forwarding.py); the replica's
ASGI messages stream back unchanged. What the ingress adds:

- /metrics: every replica's /metrics, each sample labelled `replica` (metrics.py), and
  the router's decision counts;
- a replica that dies under a request: 503 `replica_unavailable` with Retry-After (or,
  once a stream has started, an error event ending it); Serve's router drops that replica
  and the controller starts another;
- a queue over max_queued_requests: 503 `queue_full` with Retry-After;
- a client hanging up: the forwarded call is cancelled, and with it the generation.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..errors import APIError, BearerAuth, BodySizeLimit, error_response
from ..logs import log_event
from ..serving import sse, wait_for_disconnect
from .forwarding import REPLICA_HEADER, ForwardedRequest
from .metrics import merge_replicas, render_router
from .router_support import replica_ids

SCRAPE_TIMEOUT_S = 10.0
RETRY_AFTER_S = "1"


@dataclass(frozen=True)
class IngressConfig:
    app_name: str
    profile: str | None = None  # router.token_profile file; None: no prediction (queue length only)
    tokenizer: str | None = None  # directory of the tokenizer the profile's token ids come from
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    auth_exempt: tuple[str, ...] = ("/health", "/ready", "/metrics")


class CadreIngress:
    def __init__(self, replicas, config: IngressConfig):
        self.replicas, self.config = replicas, config
        self.predictor = None
        if config.profile:
            from .prediction import PromptPredictor

            self.predictor = PromptPredictor.load(config.profile, config.tokenizer)

    def __serve_build_asgi_app__(self):
        app = BodySizeLimit(self.asgi, limit=self.config.max_body_bytes)
        if self.config.api_key:
            app = BearerAuth(app, api_key=self.config.api_key, exempt=self.config.auth_exempt)
        return app

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        if scope["type"] != "http":
            return
        request = await self.forwardable(scope, receive)
        if scope["path"] == "/metrics" and scope["method"] == "GET" and request.replica is None:
            return await self.metrics(send)
        if request.replica is not None and request.replica not in (await self.replica_ids()):
            return await error_response(APIError(404, f"no replica {request.replica!r} (see {REPLICA_HEADER})",
                                                 param=REPLICA_HEADER, code="replica_not_found"))(scope, receive, send)
        await self.relay(request, scope, receive, send)

    async def forwardable(self, scope, receive) -> ForwardedRequest:
        body = bytearray()
        while True:  # BodySizeLimit replays the body it read, bounded
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = list(scope["headers"])
        pin = next((v.decode() for k, v in headers if k.decode().lower() == REPLICA_HEADER), None)
        request = ForwardedRequest(scope["method"], scope["path"], scope.get("query_string", b""), headers,
                                   bytes(body), scope.get("client"), replica=pin)
        if self.predictor is not None and pin is None and scope["method"] == "POST":
            predicted = self.predictor.predict(scope["path"], request.body)
            if predicted is not None:
                request.prediction, request.layers = predicted
        return request

    async def relay(self, request: ForwardedRequest, scope, receive, send) -> None:
        responses = self.replicas.options(stream=True, method_name="http").remote(request)
        pump = asyncio.ensure_future(self.pump(responses, request, scope, receive, send))
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when Serve cancels this handler because the client left
            if not pump.done():
                responses.cancel()
            for task in (pump, gone):
                task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)

    async def pump(self, responses, request: ForwardedRequest, scope, receive, send) -> None:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        started = False
        try:
            async for batch in responses:
                for message in batch:
                    started = started or message["type"] == "http.response.start"
                    await send(message)
        except BackPressureError:
            log_event("rejected", reason="queue_full", path=request.path)
            await error_response(APIError(503, "every replica's queue is full; retry later", code="queue_full",
                                          headers={"Retry-After": RETRY_AFTER_S}))(scope, receive, send)
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError: the replica went away
            log_event("replica_lost", level=logging.WARNING, path=request.path, error=type(exc).__name__)
            message = "the replica serving this request went away; retry (another replica will take it)"
            if not started:
                await error_response(APIError(503, message, code="replica_unavailable",
                                              headers={"Retry-After": RETRY_AFTER_S}))(scope, receive, send)
            else:
                await send({"type": "http.response.body", "body": stream_error(request.path, message).encode(),
                            "more_body": False})
        except Exception as exc:  # a fault of the forwarding itself: the client still gets an answer
            log_event("relay_failed", level=logging.ERROR, path=request.path, error=repr(exc))
            if not started:
                await error_response(APIError(500, "internal server error", type="server_error"))(scope, receive, send)

    async def replica_ids(self) -> list[str]:
        ids = replica_ids(self.config.app_name)
        if ids is None:  # the handle creates its router on first use
            await self.fetch(ForwardedRequest("GET", "/health", b"", [], b""))
            ids = replica_ids(self.config.app_name) or []
        return ids

    async def fetch(self, request: ForwardedRequest) -> tuple[int, bytes]:
        """(status, body) of a non-streaming request, whole."""
        status, body = 0, bytearray()
        async for batch in self.replicas.options(stream=True, method_name="http").remote(request):
            for message in batch:
                if message["type"] == "http.response.start":
                    status = message["status"]
                body += message.get("body", b"")
        return status, bytes(body)

    async def metrics(self, send) -> None:
        texts = {}
        # One replica at a time: calls made while handling one request share its internal
        # request id, by which Serve's router hands a chosen replica to a pending request;
        # concurrent pinned calls could swap replicas.
        for rid in await self.replica_ids():
            try:
                status, body = await asyncio.wait_for(
                    self.fetch(ForwardedRequest("GET", "/metrics", b"", [], b"", replica=rid)), SCRAPE_TIMEOUT_S)
            except Exception as exc:  # a replica going away mid-scrape: the others still report
                log_event("scrape_failed", level=logging.WARNING, replica=rid, error=type(exc).__name__)
                continue
            if status == 200:
                texts[rid] = body.decode()
        body = merge_replicas(texts) + render_router()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def stream_error(path: str, message: str) -> str:
    """The last event of a stream cut short, in the endpoint's own stream error shape."""
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_unavailable"}}
    return sse(error, event="error") if path == "/generate" else sse(error)


async def answer_lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
