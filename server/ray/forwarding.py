"""An HTTP request carried from the ingress to a replica, and its replay into an ASGI app.

Ray's proxy hands the ingress the request; the ingress forwards it, body read, as a
ForwardedRequest through a deployment handle (so the request router sees the prompt's
predicted experts), and the replica replays it into the cadre FastAPI app, streaming the
app's ASGI messages back in batches. The client hanging up cancels the ingress's handler,
which cancels the replica's generator: the replay then tells the app `http.disconnect`,
which cancels the generation exactly as under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

REPLICA_HEADER = "x-cadre-replica"  # pins a request to one replica (debugging, per-replica scrapes)
DISCONNECT_GRACE_S = 5.0  # time the app gets to wind a cancelled request down


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    prediction: list[list[float]] | None = None  # [M][E] expert shares the prompt should route to
    layers: list[int] | None = None  # the M MoE layers of the prediction
    replica: str | None = None  # route only to this replica (its Serve replica id)

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": self.headers,
                "client": self.client, "server": ("cadre-replica", 80), "state": {}}


async def replay(app, request: ForwardedRequest):
    """Run `request` through the ASGI `app`, yielding lists of the ASGI messages it sends."""
    outbox: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        outbox.put_nowait(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: outbox.put_nowait(None))
    try:
        while (message := await outbox.get()) is not None:
            batch = [message]
            while not outbox.empty() and (message := outbox.get_nowait()) is not None:
                batch.append(message)
            yield batch  # several tokens' events when the consumer is slower than the engine
            if message is None:
                break
        await task  # the app's own exception, if any
    finally:
        gone.set()  # no-op for a finished app; for a cancelled relay, the client went away
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            task.cancel()
