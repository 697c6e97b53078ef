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
    unbounded_model_facts()


def unbounded_model_facts():
    """models.footprint keeps the facts of the last 16 configs (a meta-device forward each, ~0.1 s,
    0.4 s for DeepSeek-V4): a server plans one model, but the modules that sweep the 47 tiny
    families evicted every one before its next use, and recomputed all of them per module. Here
    each config's facts are computed once (the first time, as before); they depend on nothing else."""
    import functools

    from models import footprint

    footprint._facts = functools.lru_cache(maxsize=None)(footprint._facts.__wrapped__)


_module = [None]


def pytest_runtest_setup(item):
    """At each test module's start (the last module's fixtures torn down), freeze what survived, as
    at the session's start: the imports and process-wide caches the tests before it left (every
    family's transformers modules, dynamo's and lm-eval's state) grow the tracked heap from ~130k to
    ~650k objects, and each full collection (two on every continuous-batching manager stop) walked
    all of them: 0.3-0.5 s a collection in the second half of the suite. Cyclic garbage is collected
    first, so nothing a later test drops is kept, except a cycle among objects already frozen."""
    import gc

    if item.module is not _module[0]:
        _module[0] = item.module
        gc.collect()
        gc.freeze()
    _need_cuda(item)


def _need_cuda(item) -> None:
    """A gpu-marked test fails without a CUDA device rather than passing or skipping unseen."""
    import torch

    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail("gpu-marked test run without a CUDA device (deselect with -m 'not gpu')")


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


_ray = {"last_user": None, "cluster": None}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The last test that uses the Ray cluster (after any reordering): the cluster stops once it is done."""
    users = [item for item in items if "ray_serve" in getattr(item, "fixturenames", ())]
    _ray["last_user"] = users[-1] if users else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop Ray after its last test rather than at the session's end: an idle cluster (GCS, raylet,
    controller, proxy, replicas reporting routing stats twice a second) takes ~13% of a core from
    every test after it."""
    if item is _ray["last_user"] and _ray["cluster"] is not None:
        _ray["cluster"].close()


@pytest.fixture(scope="session")
def ray_serve(tmp_path_factory):
    """A local Ray cluster running Serve (tests/ray_helpers.py), shared by the tests of server/ray;
    stopped after the last of them (pytest_runtest_teardown)."""
    from ray_helpers import RayServe

    with RayServe(tmp_path_factory.mktemp("ray")) as cluster:
        _ray["cluster"] = cluster
        yield cluster
    _ray["cluster"] = None
