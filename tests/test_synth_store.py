"""bench synth-store: a store of random weights in the extractor's exact format, that the extractor
verifies and the runtime loads and generates from; bad input exits 2 with one line."""

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
