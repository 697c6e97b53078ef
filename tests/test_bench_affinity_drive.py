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


def test_the_record_names_the_commit_that_ran(monkeypatch):
    """On the GPU machine the tree is a copy whose git HEAD is stale: $CADRE_COMMIT names the commit
    (the 2-GPU ray_scaling record once carried the stale one)."""
    from bench.affinity import result_record

    monkeypatch.setenv("CADRE_COMMIT", "abc1234")
    record = result_record("ray_scaling", ["--replicas", "2", "--json", "/tmp/x.json"], [{"tok_s": 1.0}], {}, "d")
    assert record["commit"] == "abc1234"
    assert record["command"] == "python -m bench ray_scaling --replicas 2"
