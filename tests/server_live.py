"""A live cadre server for the server tests: uvicorn on 127.0.0.1 in a thread, a tiny model.

The model is a tiny random qwen3_moe (tests/tiny_models.py) with a byte-level BPE tokenizer
built here with `tokenizers`, extracted to an expert store, served by the real runtime.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS, PAD = "<eos>", "<pad>"


def byte_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """Printable ASCII and newline as byte-level tokens, then merges of common letters up to vocab_size."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    as_unicode = {b: chr(b) for b in range(33, 127)} | {32: "\u0120", 10: "\u010a"}
    assert all(ch in alphabet for ch in as_unicode.values())
    vocab = {EOS: 0, PAD: 1}
    for b in [10, *range(32, 127)]:
        vocab[as_unicode[b]] = len(vocab)
    merges = []
    letters = "etaoinshrdlu"
    for a in letters:
        for b in [as_unicode[32], *letters]:
            pair = (b, a) if b == as_unicode[32] else (a, b)
            if len(vocab) >= vocab_size or "".join(pair) in vocab:
                continue
            vocab["".join(pair)] = len(vocab)
            merges.append(pair)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a daemon thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    access_log=False, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{self.url}/ready").text
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


# The server's ways of running forwards, as serve() options: transformers' continuous batching, cadre's
# decoder engine, and the unpadded static batches that serve the families continuous batching cannot
ENGINES = {"continuous-batching": {"engine": "continuous-batching"}, "decoder": {"engine": "decoder"},
           "static": {"engine": "continuous-batching", "batching": "static"}}

FAMILY = "qwen3_moe"  # norm_topk_prob=True in tiny_models: a token's weights sum to 1
MODEL_NAME = "tiny-qwen3"


def tiny_checkpoint(path, **overrides):
    """A tiny random qwen3_moe checkpoint with the byte-level tokenizer saved beside it."""
    from tiny_models import make_checkpoint

    checkpoint = make_checkpoint(path, FAMILY, **overrides)
    byte_tokenizer().save_pretrained(checkpoint)
    return checkpoint


def tiny_runtime(tmp_path, cache_fraction: float = 0.5, routing: str = "exact", device: str = "cpu", **overrides):
    """(checkpoint, runtime): half the experts fit, and a miss prefetches deeper layers, so
    traces and metrics see hits, misses, prefetches and evictions."""
    from extractor import extract_store
    from models import Runtime, RuntimeConfig

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", **overrides)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    config = RuntimeConfig(device=device, cache_fraction=cache_fraction, full_depth=True, routing=routing)
    return checkpoint, Runtime.from_store(tmp_path / "store", config)


def serve(runtime, **config):
    """A LiveServer for `runtime` with ServerConfig overrides; enter it, then wait_ready()."""
    from server.app import create_app
    from server.config import ServerConfig

    config = {"served_model_name": MODEL_NAME, "max_model_len": 256, "max_concurrency": 4, **config}
    return LiveServer(create_app(ServerConfig(**config), runtime=runtime))


@contextlib.contextmanager
def tiny_server(tmp_path):
    """A ready LiveServer on a tiny_runtime in `tmp_path` (a module's fixture); the runtime is closed after."""
    _, runtime = tiny_runtime(tmp_path)
    try:
        with serve(runtime) as live:
            live.wait_ready()
            yield live
    finally:
        runtime.close()
