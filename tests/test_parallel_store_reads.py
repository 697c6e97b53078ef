"""A miss in every memory tier reads its shard in chunks, by several threads at once, straight into
a staged host slot: the bytes are the file's wherever the chunk boundaries fall, a short file
fails with the shard named (after every chunk's read has finished, so none writes into memory
the caller has moved on from), and an exclusive cache with reader threads loads the store's
weights."""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from extractor.safetensors_format import pread_spans_into
from extractor.store import ExpertStore, StoreError
from test_host_tier_exclusive import make_cache, run_pattern


@pytest.fixture()
def store(store_factory):
    return ExpertStore.open(store_factory("qwen3_moe")[1])


@pytest.fixture()
def readers():
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield pool


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_chunked_reads_fill_each_span_with_the_files_bytes(tmp_path, readers, chunk_bytes):
    data = os.urandom(1000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    first, second = bytearray(300), bytearray(211)
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_spans_into(fd, [(memoryview(first), 17), (memoryview(second), 600)], readers, chunk_bytes)
    finally:
        os.close(fd)
    assert bytes(first) == data[17:317] and bytes(second) == data[600:811]


def test_a_short_file_fails_after_every_chunk_has_finished(tmp_path, readers):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    out = bytearray(200)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match="ended at byte 100"):
            pread_spans_into(fd, [(memoryview(out), 0)], readers, chunk_bytes=32)
    finally:
        os.close(fd)
    assert bytes(out[:100]) == b"x" * 100  # the chunks before the end were all read


def test_read_expert_into_with_readers_matches_the_shard(store, readers):
    layer = store.moe_layers[0]
    parts = store.load_expert(layer, 1)
    out = {name: torch.empty_like(t) for name, t in parts.items()}
    store.read_expert_into(layer, 1, out, readers=readers)
    assert all(torch.equal(out[name], parts[name]) for name in parts)


def test_a_truncated_shard_read_in_parallel_names_the_shard(store_factory, tmp_path, readers):
    store = ExpertStore.open(shutil.copytree(store_factory("qwen3_moe")[1], tmp_path / "store"))
    layer = store.moe_layers[0]
    out = {name: torch.empty_like(t) for name, t in store.load_expert(layer, 0).items()}
    path = store.expert_path(layer, 0)
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(StoreError, match="expert_000.safetensors"):
        store.read_expert_into(layer, 0, out, readers=readers)


def test_an_exclusive_cache_with_reader_threads_loads_the_stores_weights(store):
    layer = store.moe_layers[0]
    total = len(store.experts_present(layer))
    cache = make_cache(store, store.top_k, max(1, total - store.top_k - 1), load_workers=2)
    try:
        assert cache.exclusive and cache._readers is not None
        run_pattern(cache, store, steps=40)  # every lease's weights checked against the store
        assert cache.stats().loads["disk"] > 0
    finally:
        cache.close()
