"""bench serve --level-timeout: a level that would run past its time ends anyway. The requests
still streaming are cut (closed, so the server cancels them), their tokens count toward the
level's tok/s but not its latencies, and the server serves the next level as if nothing
happened. (At full depth on the H200 a 16-client level once outran its stage's timeout and
left no table at all.)"""

import argparse
import asyncio

import pytest

from bench.serve import run_level
from server_live import tiny_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("level-timeout")) as live:
        yield live


def level(server, timeout, max_tokens):
    args = argparse.Namespace(requests=8, requests_per_client=None, duration=60.0, max_tokens=max_tokens,
                              level_timeout=timeout)
    return asyncio.run(run_level(server.url, 4, ["hello world", "the cache holds"], args))


def test_a_level_past_its_time_is_cut_and_counts_what_it_streamed(server):
    cut = level(server, timeout=0.2, max_tokens=240)  # 8 requests of 240 tokens on 4 clients: > 0.2 s
    assert cut["cut"] >= 1 and cut["errors"] == 0 and cut["errors_5xx"] == 0
    assert cut["tokens"] > 0 and cut["tok_s"] > 0 and cut["wall_s"] < 5
    after = level(server, timeout=None, max_tokens=8)  # the cut streams were released on the server
    assert (after["requests"], after["cut"], after["errors"]) == (8, 0, 0)
    assert after["tokens"] == after["tokens_per_request"] * 8
