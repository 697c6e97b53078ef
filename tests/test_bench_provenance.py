"""Every bench record names the commit that ran. On the GPU machine the tree is a copy whose git
HEAD is stale, and $CADRE_COMMIT names it: bench affinity and bench synth-calibrate once asked git
themselves (the 2-GPU ray_scaling record carried a commit from two sessions before); every record
now starts with bench._provenance.header."""

import pytest

from bench import _provenance


@pytest.fixture()
def commit(monkeypatch):
    monkeypatch.setenv("CADRE_COMMIT", "abc1234")
    return "abc1234"


def test_the_affinity_and_ray_scaling_record(commit):
    from bench.affinity import result_record

    record = result_record("ray_scaling", ["--replicas", "2", "--json", "/tmp/x.json"], [{"tok_s": 1.0}], {}, "d")
    assert record["commit"] == commit
    assert record["command"] == "python -m bench ray_scaling --replicas 2"
    assert record["machine"] == _provenance.machine()


def test_the_header_every_record_starts_with(commit):
    """bench synth-calibrate and bench mixed-demo write it as it is; _provenance.write under rows."""
    facts = _provenance.header("synth-calibrate", ["--config", "qwen3-30b-a3b", "--json", "/tmp/x.json"])
    assert facts["commit"] == commit
    assert facts["command"] == "python -m bench synth-calibrate --config qwen3-30b-a3b"
