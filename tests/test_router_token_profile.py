"""router.token_profile: a per-token expert profile from routing traces predicts how a
text routes, and survives a save/load; bad input to its CLI exits 2 with one line."""

import pytest
import torch

from router.token_profile import TokenProfile, main, record


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from models import Runtime, RuntimeConfig
    from models.demo import HELDOUT_TEST_TEXT, ensure_demo_store

    store = ensure_demo_store(tmp_path_factory.mktemp("demo") / "store")
    runtime = Runtime.from_store(store, RuntimeConfig())
    ids = runtime.tokenizer(HELDOUT_TEST_TEXT.read_text(), return_tensors="pt").input_ids[0]
    yield store, runtime, ids
    runtime.close()


def routed_distribution(runtime, ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """[M, E]: the share of routing weight each expert got on `ids`, as the model routes them."""
    builder = record(runtime, ids, layers=len(layers), window=256)
    mass = builder.mass.sum(0)  # [M, E]
    return mass / mass.sum(-1, keepdim=True)


def test_prediction_tracks_how_unseen_text_routes(demo):
    _, runtime, ids = demo
    profile = record(runtime, ids[:8192], layers=2).build()
    held_out = ids[20000:22048]  # text the profile never saw
    actual = routed_distribution(runtime, held_out, profile.layers)  # [M, E]
    predicted = torch.tensor(profile.predict(held_out.tolist()))  # [M, E]
    assert torch.allclose(predicted.sum(-1), torch.ones(2), atol=1e-3)
    uniform = torch.full_like(actual, 1 / actual.shape[1])
    tv_predicted = 0.5 * (predicted - actual).abs().sum(-1)  # [M]
    tv_uniform = 0.5 * (uniform - actual).abs().sum(-1)  # [M]
    assert (tv_predicted < 0.6 * tv_uniform).all(), (tv_predicted, tv_uniform)


def test_unknown_tokens_predict_the_average_and_files_round_trip(demo, tmp_path):
    _, runtime, ids = demo
    profile = record(runtime, ids[:2048], layers=2).build(keep=4)
    unseen = next(t for t in range(runtime.model.config.vocab_size) if t not in set(ids[:2048].tolist()))
    assert torch.allclose(torch.tensor(profile.predict([unseen])), profile.mean)
    profile.save(tmp_path / "p.safetensors")
    loaded = TokenProfile.load(tmp_path / "p.safetensors")
    sample = ids[:64].tolist()
    assert loaded.layers == profile.layers and loaded.predict(sample) == profile.predict(sample)


def test_cli_bad_input_exits_2_with_one_line(demo, tmp_path, capsys):
    store, _, _ = demo
    assert main(["--store", str(store), "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (tmp_path / "t.txt").write_text("hello")
    assert main(["--store", str(tmp_path), "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
