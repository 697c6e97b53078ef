"""bench serve --requests-per-client: each level sends N requests per client, so a 16-client
level is as busy at its end as a 1-client one. With a fixed --requests 24 a 16-client level
ran one full wave and a half-empty one, and its aggregate tok/s understated what 16 clients get
(on the H200 slice at 100%: 1590 tok/s with 24 requests, 2552 with 64)."""

import argparse
import asyncio

import pytest

from bench.serve import level_requests, run_level
from server_live import tiny_server


def args(**overrides):
    return argparse.Namespace(**{"requests": 5, "requests_per_client": None, "duration": 60.0, "max_tokens": 4,
                                 "level_timeout": None, **overrides})


def test_the_count_scales_with_clients_only_when_asked():
    assert [level_requests(args(), c) for c in (1, 4, 16)] == [5, 5, 5]
    assert [level_requests(args(requests_per_client=3), c) for c in (1, 4, 16)] == [3, 12, 48]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("per-client")) as live:
        yield live


def test_a_level_sends_n_requests_per_client(server):
    rows = [asyncio.run(run_level(server.url, clients, ["hello world"], args(requests_per_client=2)))
            for clients in (1, 3)]
    assert [(row["requests"], row["errors"]) for row in rows] == [(2, 0), (6, 0)]
