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


def test_the_rate_once_every_client_streams_leaves_the_level_start_out():
    """streaming_tok_s counts the tokens after the clients-th first token (every client's first
    prefill done), over the time to the last token."""
    from bench.serve import streaming_rate

    ended = [{"arrivals": [10.0, 11.0, 12.0]}, {"arrivals": [14.0, 15.0, 16.0]}]
    assert streaming_rate(2, ended) == 2 / (16.0 - 14.0)  # since t=14: the tokens at 15 and 16
    assert streaming_rate(3, ended) is None  # only two requests streamed
    assert streaming_rate(1, ended) == 5 / (16.0 - 10.0)


def test_a_live_level_reports_its_streaming_rate(server):
    row = level(server, timeout=None, max_tokens=8)
    assert row["streaming_tok_s"] is not None and row["streaming_tok_s"] > 0
