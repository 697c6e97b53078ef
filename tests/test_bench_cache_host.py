"""bench cache-host: the expert cache's host time per MoE layer, by eviction policy, on a tiny
store of a given geometry (what it prints and records; an unknown policy is refused)."""

import json

from bench import cache_host


def test_it_times_each_policy_and_batch_and_records_them(tmp_path, capsys):
    out = tmp_path / "cache_host.json"
    code = cache_host.main(["--layers", "4", "--experts", "16", "--top-k", "2", "--batches", "1,4", "--steps", "3",
                            "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["policy"], r["batch"]) for r in rows] == [("lru", 1), ("layer-lru", 1), ("lru", 4), ("layer-lru", 4)]
    for row in rows:
        assert row["us_per_layer"] > 0 and row["loads_per_layer"] > 0 and 0 <= row["hit_rate"] <= 1
    assert "us / layer" in capsys.readouterr().out


def test_an_unknown_policy_is_refused_with_exit_2(tmp_path, capsys):
    assert cache_host.main(["--policies", "fifo", "--workdir", str(tmp_path)]) == 2
    assert "fifo" in capsys.readouterr().err
