"""bench synth-store: a store of random weights in the extractor's exact format (dense or FP8 experts),
that the extractor verifies and the runtime loads and generates from; bad input exits 2 with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.synth_store import main as synth_store
from extractor.extract import verify_store
from extractor.store import ExpertStore
from models import Runtime, RuntimeConfig

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, family: str, **overrides) -> Path:
    from tiny_models import tiny_config

    path.mkdir(parents=True, exist_ok=True)
    tiny_config(family, **overrides).to_json_file(path / "config.json")
    return path / "config.json"


@pytest.fixture(scope="module")
def demo_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "demo-2l"
    assert synth_store(["--config", "demo", "--layers", "2", "--out", str(out), "--workers", "2"]) == 0
    return out


def test_the_store_verifies_and_has_the_real_shapes(demo_synth):
    assert verify_store(demo_synth) == []
    store = ExpertStore.open(demo_synth)
    demo = json.loads((ROOT / "models/demo/checkpoint/config.json").read_text())
    assert (store.num_layers, store.moe_layers, store.num_experts, store.top_k) == (2, [0, 1], 32, 4)
    shard = store.load_expert(1, 31)
    assert shard["gate_proj"].shape == (demo["moe_intermediate_size"], demo["hidden_size"])
    assert shard["down_proj"].shape == (demo["hidden_size"], demo["moe_intermediate_size"])
    assert store.dtype == torch.bfloat16 and shard["up_proj"].dtype == torch.bfloat16
    assert abs(float(shard["up_proj"].float().std()) - 0.02) < 0.005  # transformers' init scale
    synthetic = store.manifest["synthetic"]
    assert synthetic["config"] == "demo" and {"embed_std", "gate_std", "skew"} <= set(synthetic)


def test_the_cli_verifies_it_too(demo_synth):
    result = subprocess.run([sys.executable, "-m", "extractor", "--out", str(demo_synth), "--verify"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_runtime_loads_it_and_generates(demo_synth):
    runtime = Runtime.from_store(demo_synth, RuntimeConfig(device="cpu", dtype="float32", cache_fraction=0.5))
    try:
        ids = runtime.generate("ROMEO:", max_new_tokens=6)
        assert ids.shape[1] == len(runtime.tokenizer("ROMEO:").input_ids) + 6
        assert runtime.plan.expert_slots == 32  # half of 2 x 32
    finally:
        runtime.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_tiny_config_of_each_naming_loads(tmp_path, family):
    """Mixtral's router is `block_sparse_moe.gate` on disk and `mlp.gate` in memory: the trunk
    carries checkpoint names, as extracted stores do."""
    config = write_config(tmp_path / "cfg", family)
    out = tmp_path / "store"
    assert synth_store(["--config", str(config), "--out", str(out), "--dtype", "float32"]) == 0
    assert verify_store(out) == []
    from safetensors.torch import load_file

    trunk = load_file(out / "trunk.safetensors")
    on_disk = "model.layers.0.block_sparse_moe.gate.weight" if family == "mixtral" else "model.layers.0.mlp.gate.weight"
    runtime = Runtime.from_store(out, RuntimeConfig(device="cpu"))
    try:
        assert runtime.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3).shape == (1, 6)
        gate = runtime.model.get_parameter("model.layers.0.mlp.gate.weight")
        assert torch.equal(gate.detach(), trunk[on_disk])  # loaded from the trunk, not left at its init
    finally:
        runtime.close()


@pytest.mark.parametrize("args, named", [
    (["--config", "demo", "--layers", "99"], "--layers 99"),
    (["--config", "demo", "--workers", "0"], "--workers 0"),
    (["--config", "demo", "--expert-format", "fp8"], "block 128x128 does not divide"),  # the demo's [64, 192]
    (["--config", "demo", "--expert-format", "fp8", "--fp8-block", "0"], "--fp8-block 0"),
    (["--config", "demo", "--fp8-block", "64"], "only with --expert-format fp8"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, named):
    assert synth_store(["--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "s").exists()


def test_the_process_exits_2_with_one_line(tmp_path):
    """The same as a user sees it: the exit code and stderr of `python -m bench synth-store`."""
    result = subprocess.run([sys.executable, "-m", "bench", "synth-store", "--out", str(tmp_path / "s"),
                             "--config", "no-such-model"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--config no-such-model: no such config" in result.stderr


def test_a_non_empty_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert synth_store(["--config", "demo", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_deepseek_v2_mla_with_a_dense_first_layer_and_shared_experts(tmp_path):
    """MLA, a dense first layer, shared experts: the trunk holds them under checkpoint names, the
    store verifies, and the runtime generates from it."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "deepseek_v2", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
        "n_shared_experts": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "kv_lora_rank": 24,
        "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 12, "v_head_dim": 20, "vocab_size": 64}))
    out = tmp_path / "store"
    assert synth_store(["--config", str(config), "--out", str(out), "--dtype", "float32"]) == 0
    assert verify_store(out) == []
    store = ExpertStore.open(out)
    assert store.manifest["family"] == "deepseek_v2"
    assert (store.moe_layers, store.num_experts, store.top_k) == ([1, 2], 8, 2)
    from safetensors import safe_open

    with safe_open(out / "trunk.safetensors", "pt") as trunk:
        names = set(trunk.keys())
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    assert not any(".experts." in name for name in names)
    runtime = Runtime.from_store(out, RuntimeConfig(device="cpu", cache_fraction=0.5))
    try:
        assert runtime.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3).shape == (1, 6)
    finally:
        runtime.close()


def test_the_spread_is_what_the_docs_say():
    from bench.synth_weights import Spread, expert_tensor, residual_std, trunk_tensor

    spread = Spread(embed_std=0.7, gate_std=0.05, skew=1.0)

    def draw(name, shape):
        return trunk_tensor(name, shape, torch.float32, seed=1, spread=spread, init_std=0.02, num_experts=64,
                            layers=8).float()

    assert torch.equal(draw("model.layers.3.input_layernorm.weight", (256,)), torch.ones(256))
    assert torch.equal(draw("model.layers.3.self_attn.q_proj.bias", (256,)), torch.zeros(256))
    assert abs(draw("model.embed_tokens.weight", (512, 256)).std() - 0.7) < 0.02
    assert abs(draw("model.layers.3.self_attn.q_proj.weight", (512, 256)).std() - 0.02) < 0.001
    assert abs(draw("model.layers.3.self_attn.o_proj.weight", (512, 256)).std() - residual_std(0.02, 8)) < 0.0005
    rows = draw("model.layers.3.mlp.gate.weight", (64, 1024)).std(dim=1)  # per-expert scale exp(skew z)
    assert rows.max() / rows.min() > 5 and abs(rows.median() - 0.05) < 0.02
    again = draw("model.layers.3.mlp.gate.weight", (64, 1024))
    assert torch.equal(again, draw("model.layers.3.mlp.gate.weight", (64, 1024)))  # reproducible per name
    expert = expert_tensor(2, 5, 64, 32, torch.float32, seed=1, init_std=0.02, layers=8)  # [3IH]
    gate, down = expert[: 64 * 32], expert[2 * 64 * 32:]
    assert abs(gate.std() - 0.02) < 0.002 and abs(down.std() - residual_std(0.02, 8)) < 0.0005


# --- --expert-format fp8: Qwen3-30B-A3B-FP8's layout (the demo's 64 x 192 experts need a 64 block) ---------------

@pytest.fixture(scope="module")
def demo_fp8(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "demo-2l-fp8"
    assert synth_store(["--config", "demo", "--layers", "2", "--expert-format", "fp8", "--fp8-block", "64",
                        "--out", str(out), "--workers", "2"]) == 0
    return out


def test_fp8_experts_are_what_the_extractor_writes(demo_fp8, demo_synth):
    """The manifest's expert_format and each shard's tensors are `extractor --dtype fp8`'s, the store
    verifies through the extractor's CLI, and each shard is the extractor's quantiser applied to the
    dense store's weights of the same seed: the same draw, half the bytes."""
    from extractor.__main__ import main as extractor_cli
    from extractor.formats import FP8, manifest_entry
    from extractor.quant import quantize_fp8
    from extractor.safetensors_format import read_header

    store, dense = ExpertStore.open(demo_fp8), ExpertStore.open(demo_synth)
    assert store.manifest["expert_format"] == manifest_entry(FP8, False, [64, 64])
    assert store.dtype == torch.bfloat16 and store.manifest["plan"] != dense.manifest["plan"]
    assert extractor_cli(["--out", str(demo_fp8), "--verify", "--quiet"]) == 0
    header = {info.name: (info.dtype, info.shape) for info in read_header(store.expert_path(1, 31))}
    assert header == {"gate_proj": ("F8_E4M3", (64, 192)), "up_proj": ("F8_E4M3", (64, 192)),
                      "down_proj": ("F8_E4M3", (192, 64)), "gate_proj_scale_inv": ("F32", (1, 3)),
                      "up_proj_scale_inv": ("F32", (1, 3)), "down_proj_scale_inv": ("F32", (3, 1))}
    for layer, expert in [(0, 0), (1, 31)]:
        shard, drawn = store.load_expert(layer, expert), dense.load_expert(layer, expert)
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight, scale_inv = quantize_fp8(drawn[name], (64, 64))
            assert torch.equal(shard[name].view(torch.uint8), weight.view(torch.uint8)), (layer, expert, name)
            assert torch.equal(shard[name + "_scale_inv"], scale_inv), (layer, expert, name)
    assert store.expert_nbytes(0, 0) == 3 * 64 * 192 + 3 * 3 * 4 == dense.expert_nbytes(0, 0) // 2 + 36


def test_the_runtime_serves_fp8_experts_as_their_dequantised_weights(demo_fp8):
    """Logits equal stock transformers' with every expert dequantised by models.expert_format, greedy
    tokens are the same at 100% and at a quarter of the experts, and a miss moves the quantised shard."""
    from bench.store_reference import reference_from_store
    from models.expert_format import dense_weights

    store = ExpertStore.open(demo_fp8)
    reference = reference_from_store(demo_fp8, "cpu", torch.float32, "grouped_mm")
    for layer in store.moe_layers:
        experts = reference.model.layers[layer].mlp.experts
        for expert in store.experts_present(layer):
            dense = dense_weights(store.expert_format, store.load_expert(layer, expert), torch.float32)
            experts.gate_up_proj.data[expert] = torch.cat([dense["gate_proj"], dense["up_proj"]])
            experts.down_proj.data[expert] = dense["down_proj"]
    ids = torch.randint(3, 8000, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected_logits = reference(ids).logits
    expected = reference.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for fraction in (1.0, 0.25):
        runtime = Runtime.from_store(demo_fp8, RuntimeConfig(device="cpu", dtype="float32", cache_fraction=fraction))
        try:
            with torch.no_grad():
                torch.testing.assert_close(runtime.model(ids).logits, expected_logits, atol=1e-4, rtol=0)
            assert torch.equal(runtime.generate(ids, max_new_tokens=8, min_new_tokens=8), expected), fraction
            stats = runtime.cache.stats()
            loads = sum(stats.loads.values())
            assert loads > 0 and stats.bytes_loaded == loads * store.expert_nbytes(0, 0)
        finally:
            runtime.close()
