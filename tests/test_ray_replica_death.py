"""A replica that dies under requests: they fail with a clear 503 (or, for a stream already
under way, a closing error event) and can be retried; new requests go to the survivor."""

import asyncio
import json

import httpx
import pytest

from ray_helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(ray_serve):
    ray_serve.deploy(ray_serve.config())
    return ray_serve


async def kill_under_load(cluster, victim: str) -> tuple[httpx.Response, list[str]]:
    """A whole-reply request and a stream on `victim`; kill it once the stream has a token."""
    pin = {"x-cadre-replica": victim}
    long = {"prompt": "Now is the winter of our discontent", "max_new_tokens": 400}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
        whole = asyncio.ensure_future(client.post("/generate", json=long, headers=pin))
        lines = []
        async with client.stream("POST", "/generate", json={**long, "stream": True}, headers=pin) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                lines.append(line)
                if line.startswith("event: token") and len(lines) == 1:
                    cluster.kill(victim)
        return await whole, lines


def test_in_flight_requests_fail_clearly_and_the_survivor_serves(cluster):
    victim, survivor = cluster.replica_ids()
    whole, lines = asyncio.run(kill_under_load(cluster, victim))
    assert whole.status_code == 503 and whole.headers["retry-after"] == "1"
    assert whole.json()["error"]["code"] == "replica_unavailable"
    assert "event: error" in lines  # the stream had started: it ends with an error event
    error = json.loads(lines[lines.index("event: error") + 1][len("data: "):])
    assert error["error"]["code"] == "replica_unavailable"
    for _ in range(6):  # routed around: no request reaches the dead replica
        retry = httpx.post(f"{cluster.url}/generate", json={"prompt": "Retry", "max_new_tokens": 2}, timeout=60)
        assert retry.status_code == 200, retry.text
    # Serve replaces the replica; both answer again
    wait_until(lambda: len(cluster.replica_ids()) == 2 and victim not in cluster.replica_ids(), timeout=120,
               interval=0.25)
    assert survivor in cluster.replica_ids()
