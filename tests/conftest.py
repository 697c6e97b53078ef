"""Shared fixtures: tiny checkpoints of every family and their expert stores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models

from tiny_models import make_checkpoint  # noqa: E402


def pytest_sessionstart(session):
    """Move what the imports created (torch, transformers, cadre: ~400k objects) out of the garbage
    collector's reach: every full collection then skips them. transformers' continuous batching
    runs one on each manager stop (0.2-0.6 s here), and the server tests stop one per server."""
    import gc

    import server.app  # noqa: F401 -- the heaviest imports, done before freezing
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(family, **make_checkpoint kwargs) -> Path, built once per session."""
    built: dict[tuple, Path] = {}

    def build(family: str, **kwargs) -> Path:
        key = (family, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            built[key] = make_checkpoint(path, family, **kwargs)
        return built[key]

    return build


@pytest.fixture(scope="session")
def store_factory(tmp_path_factory, checkpoint_factory):
    """store_factory(family, experts="all", **checkpoint kwargs) -> (checkpoint, store) paths."""
    from extractor import extract_store

    built: dict[tuple, tuple[Path, Path]] = {}

    def build(family: str, experts: str = "all", **kwargs) -> tuple[Path, Path]:
        key = (family, experts, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in built:
            checkpoint = checkpoint_factory(family, **kwargs)
            store = tmp_path_factory.mktemp(f"store-{family}")
            extract_store(checkpoint, store, experts=experts, quiet=True)
            built[key] = (checkpoint, store)
        return built[key]

    return build


@pytest.fixture(scope="session")
def ray_serve(tmp_path_factory):
    """A local Ray cluster running Serve (tests/ray_helpers.py), shared by the tests of server/ray."""
    from ray_helpers import RayServe

    with RayServe(tmp_path_factory.mktemp("ray")) as cluster:
        yield cluster
