"""python -m models: a generation from the shell, and one clear line for bad input."""

import subprocess
import sys

import pytest

from models.__main__ import main
from models.demo import ensure_demo_store


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return ensure_demo_store(tmp_path_factory.mktemp("cli") / "demo-store")


def test_generates_under_a_budget_and_reports_the_cache(demo_store, capsys):
    code = main(["--store", str(demo_store), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--cache-fraction", "0.25", "--eviction", "layer-lru", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("ROMEO:") and len(out.strip()) > len("ROMEO:")
    assert "8 tokens" in err and "cache hit rate" in err and "/" in err


@pytest.mark.parametrize("args, named", [
    (["--eviction", "fifo"], "unknown eviction policy 'fifo'"),
    (["--routing", "nope"], "unknown routing policy 'nope'"),
    (["--cache-fraction", "1.5"], "cache_fraction must be in (0, 1]"),
])
def test_bad_options_exit_2_with_one_line(demo_store, args, named, capsys):
    """In this process (the process-level exit is test_a_missing_store_exits_2_naming_it's)."""
    assert main(["--store", str(demo_store), "--prompt", "x", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


def test_a_missing_store_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no-store"
    result = subprocess.run([sys.executable, "-m", "models", "--store", str(missing), "--prompt", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr, result.stderr
