"""The runtime sizes its cache from the memory plan: a budget that fits starts and generates, one
that does not is refused before anything loads (python -m models: exit 2, one line)."""

import subprocess
import sys

import pytest

import models.runtime as runtime_module
from models import Runtime, RuntimeConfig
from models.demo import ensure_demo_store
from models.memory_plan import PlanError


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return ensure_demo_store(tmp_path_factory.mktemp("plan") / "demo-store")


def test_a_budget_that_fits_starts_and_sizes_the_cache(demo_store):
    runtime = Runtime.from_store(demo_store, RuntimeConfig(device="cpu", dtype="float32", gpu_memory="40MiB"))
    try:
        plan = runtime.plan
        assert plan.budget_bytes == 40 << 20 and plan.budget_source == "--gpu-memory 40MiB"
        assert runtime.cache.capacity_bytes == plan.expert_cache_bytes == plan.expert_slots * plan.slot_bytes
        assert runtime.cache.slot_bytes == plan.slot_bytes  # the plan's slot is the cache's slot
        assert 32 <= plan.expert_slots < 256  # more than one token's top-k per layer, less than everything
        assert runtime.generate("ROMEO:", max_new_tokens=4).shape[1] > 4
    finally:
        runtime.close()


def test_the_default_plan_holds_every_expert_of_a_small_model(demo_store):
    runtime = Runtime.from_store(demo_store, RuntimeConfig(device="cpu"))
    try:
        assert runtime.plan.holds_every_expert and runtime.cache.holds_everything
    finally:
        runtime.close()


def test_a_budget_that_cannot_fit_is_refused_before_loading(demo_store, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded despite a plan that cannot fit")

    monkeypatch.setattr(runtime_module, "load_model", must_not_load)
    with pytest.raises(PlanError, match="memory plan does not fit: the expert cache \\(32 slots"):
        Runtime.from_store(demo_store, RuntimeConfig(device="cpu", dtype="float32", gpu_memory="24MiB"))


def test_the_cli_refuses_with_one_line(demo_store):
    result = subprocess.run([sys.executable, "-m", "models", "--store", str(demo_store), "--prompt", "x",
                             "--device", "cpu", "--gpu-memory", "1MiB"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "memory plan does not fit" in result.stderr, result.stderr
