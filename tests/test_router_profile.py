"""A usage profile recorded by the router round-trips through JSON and the extractor's
`--experts auto:N --profile`, which keeps exactly the profile's N most used experts per layer."""

import json

import torch

from extractor import extract_store
from extractor.__main__ import main as extractor_main
from extractor.store import ExpertStore
from models import Runtime, RuntimeConfig
from router.profile import UsageProfile, record


def test_profile_round_trips_through_json_and_the_extractor(store_factory, tmp_path, capsys):
    checkpoint, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig())
    ids = torch.randint(3, 120, (96,), generator=torch.Generator().manual_seed(11))
    profile = record(runtime, ids, window=32)
    assert profile.tokens == 96
    for layer, uses in profile.uses.items():
        assert int(uses.sum()) == 96 * runtime.store.top_k  # every token, every slot, counted once
    path = tmp_path / "usage.json"
    profile.save(path)
    loaded = UsageProfile.load(path)
    assert {l: u.tolist() for l, u in loaded.uses.items()} == {l: u.tolist() for l, u in profile.uses.items()}

    extract_store(checkpoint, tmp_path / "auto4", experts="auto:4", profile=path)
    kept = {layer: ExpertStore.open(tmp_path / "auto4").experts_present(layer) for layer in profile.uses}
    assert kept == profile.top(4)
    assert len({tuple(ids) for ids in kept.values()}) > 1  # per-layer choices, not one fixed range

    assert extractor_main(["--model", str(checkpoint), "--out", str(tmp_path / "cli"), "--experts", "auto:4",
                           "--profile", str(path), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["experts"] == {str(layer): ids for layer, ids in kept.items()}


def test_auto_without_or_with_a_bad_profile_is_one_line_exit_2(store_factory, tmp_path, capsys):
    checkpoint, _ = store_factory("qwen3_moe")
    assert extractor_main(["--model", str(checkpoint), "--out", str(tmp_path / "a"), "--experts", "auto:4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--profile" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert extractor_main(["--model", str(checkpoint), "--out", str(tmp_path / "b"), "--experts", "auto:4",
                           "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err


def test_profile_cli_writes_a_profile_and_rejects_bad_input_in_one_line(tmp_path, capsys):
    from models.demo import HELDOUT_TEST_TEXT, ensure_demo_store
    from router.profile import main

    store = ensure_demo_store(tmp_path / "demo-store")
    out = tmp_path / "usage.json"
    assert main(["--store", str(store), "--text", str(HELDOUT_TEST_TEXT), "--out", str(out), "--max-tokens", "64"]) == 0
    profile = UsageProfile.load(out)
    assert profile.tokens == 64 and len(profile.uses) == 8
    capsys.readouterr()  # transformers' weight-loading progress bar
    assert main(["--store", str(tmp_path / "nowhere"), "--text", str(HELDOUT_TEST_TEXT), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err
