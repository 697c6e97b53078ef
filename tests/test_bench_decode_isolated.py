"""bench decode --isolate --sequential: the transformers rows come from child processes (each
names the transformers version it ran), cadre rows are measured one at a time, and every
row carries what the table prints (routing entropy, disk loads)."""

import json

from bench import decode


def test_isolated_sequential_rows(tmp_path):
    out = tmp_path / "rows.json"
    assert decode.main(["--model", "tiny", "--budgets", "0.5", "--impls", "eager", "--tokens", "4", "--repeats", "1",
                        "--isolate", "--sequential", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    reference = rows["transformers eager, eager"]
    assert reference["tok_s"] > 0 and reference["transformers"]
    cadre = next(row for name, row in rows.items() if name.startswith("cadre 50%"))
    assert 0 < cadre["routing_entropy"] <= 1
    assert cadre["disk_loads_per_token"] == cadre["loads_per_token"]  # CPU: no host tier, misses read the store


def test_children_inherit_the_run_but_not_its_outputs():
    argv = ["--model", "tiny", "--json", "x.json", "--workdir", "/w", "--isolate", "--sequential",
            "--reference-pythonpath", "", "--tokens", "4"]
    assert decode._without_outputs(argv) == ["--tokens", "4"]
    assert decode._without_outputs(["--reference-timeout", "9", "--tokens", "4"]) == ["--tokens", "4"]


def test_a_reference_child_past_its_timeout_becomes_an_error_row(tmp_path):
    out = tmp_path / "rows.json"
    assert decode.main(["--model", "tiny", "--budgets", "", "--impls", "eager", "--tokens", "4", "--repeats", "1",
                        "--isolate", "--sequential", "--reference-timeout", "0.5", "--workdir", str(tmp_path / "work"),
                        "--json", str(out)]) == 0
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    assert "timed out after 0.5 s" in rows["transformers eager, eager"]["error"]


def test_an_unknown_eviction_policy_is_refused_before_anything_loads(capsys):
    from bench.decode import main

    assert main(["--eviction", "fifo"]) == 2
    assert "--eviction" in capsys.readouterr().err
