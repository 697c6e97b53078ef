"""bench affinity's (and bench ray_scaling's) client loop against a live server: each client sticks
to one source's prompts and every request's result is collected. It called bench serve's
one_request after that began appending its result to a list the caller passes, and failed on its
first request (found on the 2-GPU machine, where it cost a lent run)."""

import asyncio

import pytest

from bench.affinity import drive
from server_live import tiny_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("affinity-drive")) as live:
        yield live


def test_every_request_of_every_client_comes_back(server):
    prompts = {"plays": ["to be or not"], "prose": ["the weather was fine"]}
    results, started = asyncio.run(drive(server.url, prompts, clients=2, requests=5, max_tokens=3))
    assert len(results) == 5
    assert [r["status"] for r in results] == [200] * 5
    assert all(r["tokens"] == 3 and r["end"] > started for r in results)

