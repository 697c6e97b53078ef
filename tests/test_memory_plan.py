"""The memory planner on real configs (bench/configs, the demo): parts, KV, refusals.

Budgets are given as MemoryInfo, so the plans are the same on any machine."""

import json
import math
from pathlib import Path

import pytest
import torch

from models.footprint import facts_from_config
from models.host_tier import entries_within
from models.memory_plan import GiB, MemoryInfo, PlanError, PlanRequest, parse_budget, plan_memory

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {name: ROOT / "bench" / "configs" / f"{name}.json" for name in
           ("qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b")} | {"demo": ROOT / "models/demo/checkpoint/config.json"}
H200 = MemoryInfo(total=150 * 10**9, free=148 * 10**9)
HOST = MemoryInfo(total=128 * GiB, free=120 * GiB)


def facts(name, dtype=torch.bfloat16):
    return facts_from_config(json.loads(CONFIGS[name].read_text()), dtype)


def plan(name, **request):
    return plan_memory(facts(name), PlanRequest(**{"device": "cuda", **request}), H200, HOST)


def test_qwen3_30b_a3b_sizes_match_the_published_model():
    f = facts("qwen3-30b-a3b")
    assert f.expert_bytes == 3 * 768 * 2048 * 2  # one expert slice: 9.4 MB in bf16
    assert f.total_experts == 48 * 128 and f.working_set == 48 * 8
    assert f.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2  # 48 layers x K and V x 4 heads x 128 x bf16
    assert 3.0e9 < f.trunk_bytes < 3.2e9  # 1.54 B non-expert parameters
    assert abs(f.trunk_bytes + f.expert_bytes * f.total_experts - 61.06e9) < 0.05e9  # 30.5 B parameters
    assert f.context == 40960


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_parts_fill_the_budget_and_never_exceed_it(name):
    for budget in ("16GiB", "24GiB", "0.5"):
        try:
            p = plan(name, gpu_memory=budget, host_memory="32GiB")
        except PlanError as exc:
            assert name == "mixtral-8x7b", exc  # 2 x 32 experts of 352 MB: more than 24 GiB on their own
            continue
        used = sum(size for part, size in p.parts().items() if part != "host_tier")
        assert used <= p.budget_bytes
        assert p.budget_bytes - used < p.slot_bytes or p.holds_every_expert  # leftovers: less than one slot
        assert p.kv_cache_bytes == p.kv_tokens * p.kv_bytes_per_token
        assert p.expert_cache_bytes == p.expert_slots * p.slot_bytes
        assert p.expert_slots >= min(p.total_experts, facts(name).working_set)
        assert p.max_model_len <= p.context and p.kv_tokens >= p.max_model_len
        assert p.host_tier_bytes <= 32 * GiB


def test_kv_follows_max_model_len_times_max_concurrency_when_both_are_given():
    p = plan("qwen3-30b-a3b", gpu_memory="24GiB", max_model_len=4096, max_concurrency=16)
    assert (p.kv_tokens, p.max_model_len, p.max_concurrency) == (16 * 4096, 4096, 16)
    assert p.kv_cache_bytes == 16 * 4096 * 98304
    assert p.concurrency_at_max_len == 16


def test_default_kv_never_reserves_the_full_context_for_every_slot():
    p = plan("qwen3-30b-a3b", gpu_memory="24GiB", default_concurrency=16, max_batch_tokens=512)
    assert p.max_concurrency == 16 and p.max_model_len == 40960  # the model's context, as vLLM would
    assert p.kv_tokens < 16 * 40960  # today's server would reserve (16 + 2) x 40960 tokens = 72 GB
    assert 1 <= p.concurrency_at_max_len < 2  # what is logged: full-length requests that fit at once
    assert "1." in p.describe() and "at full length" in p.describe()


def test_a_small_budget_cuts_the_default_length_and_says_so():
    p = plan("qwen3-30b-a3b", gpu_memory="12GiB")
    assert p.max_model_len < p.context and p.max_model_len % 64 == 0
    assert any("max_model_len" in note for note in p.notes)


def test_a_budget_that_cannot_hold_the_working_set_is_refused_with_one_line():
    with pytest.raises(PlanError) as caught:
        plan("qwen3-30b-a3b", gpu_memory="6GiB")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("memory plan does not fit: the expert cache (384 slots x 9.4 MB, one token's top-k")
    needed = 384 * 9437184
    left = int(message.split("has ")[1].split(" bytes")[0])
    short = int(message.split("short by ")[1].split(" bytes")[0])
    assert f"needs {needed} bytes" in message and short == needed - left > 0
    assert f"({short / GiB:.3g} GiB)" in message
    with pytest.raises(PlanError, match="the trunk needs"):
        plan("qwen3-30b-a3b", gpu_memory="2GiB")


def test_max_model_len_beyond_the_context_is_refused():
    with pytest.raises(PlanError, match="--max-model-len 40961 exceeds the model's context of 40960 tokens"):
        plan("qwen3-30b-a3b", gpu_memory="24GiB", max_model_len=40961)


def test_cache_bytes_and_fraction_are_checked_against_the_plan():
    p = plan("qwen3-30b-a3b", gpu_memory="24GiB", cache_fraction=0.25)
    assert p.expert_slots == 1536 and p.expert_cache_bytes == 1536 * 9437184
    with pytest.raises(PlanError, match="the expert cache \\(3072 slots"):
        plan("qwen3-30b-a3b", gpu_memory="24GiB", cache_fraction=0.5)
    small = plan("qwen3-30b-a3b", gpu_memory="24GiB", cache_bytes=8 * 9437184)  # streams through 8 slots
    assert small.expert_slots == 8
    with pytest.raises(PlanError, match="smaller than one expert"):
        plan("qwen3-30b-a3b", gpu_memory="24GiB", cache_bytes=1000)


def test_the_host_tier_is_capped_and_refused_below_one_layers_working_set():
    p = plan("qwen3-30b-a3b", gpu_memory="24GiB", host_memory="8GiB")
    assert p.host_tier_bytes <= 8 * GiB and p.host_tier_experts == entries_within(p.host_tier_bytes, p.slot_bytes)
    assert p.host_tier_experts * p.slot_bytes > 0.95 * 8 * GiB  # power-of-two chunks waste little
    every = plan("qwen3-30b-a3b", gpu_memory="24GiB", host_memory="100GiB")
    assert every.host_tier_experts == 6144 and every.host_tier_bytes < 6144 * every.slot_bytes * 1.04
    with pytest.raises(PlanError, match="fewer than one layer's working set of 8"):
        plan("qwen3-30b-a3b", gpu_memory="24GiB", host_memory="50MB")
    assert plan("qwen3-30b-a3b", gpu_memory="24GiB").host_budget_bytes == 60 * GiB  # half the available RAM
    assert plan("demo", device="cpu", gpu_memory="1GiB").host_tier_bytes == 0  # the CPU is its own host


def test_deepseek_v2_lite_kv_is_the_compressed_latent_transformers_caches():
    f = facts("deepseek-v2-lite")
    assert f.kv_bytes_per_token == 27 * (512 + 64) * 2  # kv_lora_rank + qk_rope_head_dim, every layer
    assert f.moe_layers == list(range(1, 27)) and f.num_experts == 64 and f.top_k == 6  # first layer dense
    assert f.expert_bytes == 3 * 1408 * 2048 * 2


def test_budget_specs():
    assert parse_budget("24GiB", 0, "--gpu-memory")[0] == 24 * GiB
    assert parse_budget("512 MB", 0, "--gpu-memory")[0] == 512 * 10**6
    assert parse_budget(25769803776, 0, "--gpu-memory")[0] == 24 * GiB
    assert parse_budget("0.5", 1000, "--gpu-memory")[0] == 500
    assert parse_budget("90%", 1000, "--gpu-memory")[0] == 900
    for bad in ("lots", "1.5", "0", "-3GiB", "12 parsecs", "120%"):
        with pytest.raises(PlanError):
            parse_budget(bad, 1000, "--gpu-memory")


# --- the KV the planner counts is what transformers' cache holds ---------------------------------
TINY = {
    "qwen3_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                      num_experts_per_tok=2, vocab_size=64),
    "mixtral": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=64),
    "deepseek_v2": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=24, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20, vocab_size=64),
    "deepseek_v3": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=64),
}


@pytest.mark.parametrize("family", list(TINY))
def test_kv_and_weights_match_a_real_model_measured(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **TINY[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = 5
    with torch.no_grad():
        out = model(torch.arange(tokens)[None], use_cache=True)
    cache = next(v for k, v in out.items() if k in ("cache", "past_key_values"))
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    f = facts_from_config({"model_type": family, **TINY[family]}, torch.float32)
    assert f.kv_bytes_per_token * tokens == cached  # measured tensors, every layer, K and V
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    trunk = sum(p.numel() for p in model.parameters()) - routed + sum(b.numel() for b in model.buffers())
    assert f.trunk_bytes == 4 * trunk
    assert f.expert_bytes * f.total_experts == 4 * routed
    assert math.isclose(f.expert_bytes, 4 * 3 * f.expert_intermediate * 32)


def test_slot_rows_give_every_request_a_whole_row():
    """The decoder engine holds one KV row of max_model_len per request: rows x length."""
    rows = plan("qwen3-30b-a3b", gpu_memory="24GiB", default_concurrency=16, max_batch_tokens=512, slot_rows=True)
    assert rows.kv_tokens == rows.max_concurrency * rows.max_model_len and rows.max_concurrency == 16
    assert rows.max_model_len % 64 == 0 and 512 <= rows.max_model_len < rows.context
    shared = plan("qwen3-30b-a3b", gpu_memory="24GiB", default_concurrency=16, max_batch_tokens=512)
    assert abs(rows.kv_cache_bytes - shared.kv_cache_bytes) < 16 * 64 * rows.kv_bytes_per_token  # the same share
    given = plan("qwen3-30b-a3b", gpu_memory="24GiB", default_concurrency=16, max_model_len=8192, slot_rows=True)
    assert given.max_model_len == 8192 and 1 <= given.max_concurrency < 16  # fewer rows of the length asked
    tight = plan("qwen3-30b-a3b", gpu_memory="10GiB", default_concurrency=16, slot_rows=True)
    assert tight.max_model_len == 512 and tight.max_concurrency < 16  # rows of at least 512 tokens
    with pytest.raises(PlanError, match="the KV cache"):
        plan("qwen3-30b-a3b", gpu_memory="10GiB", max_concurrency=64, slot_rows=True)


def test_the_server_plans_rows_for_the_decoder_engine():
    from server.app import uses_decoder

    from models.footprint import hf_config

    qwen = hf_config(json.loads(CONFIGS["qwen3-30b-a3b"].read_text()))
    assert uses_decoder("auto", "cuda", qwen) and not uses_decoder("auto", "cpu", qwen)
    assert uses_decoder("decoder", "cpu", qwen) and not uses_decoder("continuous-batching", "cuda", qwen)
    sliding = hf_config({**json.loads(CONFIGS["qwen3-30b-a3b"].read_text()), "use_sliding_window": True,
                         "sliding_window": 4096})
    assert not uses_decoder("auto", "cuda", sliding)
    with pytest.raises(ValueError, match="--engine decoder: sliding-window"):
        uses_decoder("decoder", "cuda", sliding)


def test_the_dry_run_prints_one_line_or_refuses_with_one(capsys):
    from models.plan import main as dry_run

    assert dry_run([str(CONFIGS["qwen3-30b-a3b"]), "--gpu-memory", "24GiB", "--server"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("memory plan (cuda, budget 24.00 GiB") and "1724 slots" in out[0]
    assert dry_run([str(CONFIGS["mixtral-8x7b"]), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "short by" in err


def test_a_config_whose_layers_differ_is_planned_from_each_layer():
    """dots.note 3's sliding layers have their own head counts and latent width (a heterogeneous
    config: transformers refuses to read those attributes globally). The workspace takes the
    widest layer's heads; the KV formula adds the layers up."""
    from transformers import AutoConfig

    from models.footprint import _kv_formula
    from tiny_models import FAMILY_CONFIGS

    config = {**FAMILY_CONFIGS["dots3_note_text"], "swa_kv_lora_rank": 8}
    f = facts_from_config({"model_type": "dots3_note_text", **config}, torch.float32)
    assert f.num_heads == 4 and f.head_dims == (16, 8)  # full layers: 4 heads; sliding: 2
    text = AutoConfig.for_model("dots3_note_text", **config)
    assert text.layer_types == ["indexed_attention", "indexed_attention", "sliding_attention", "sliding_attention"]
    assert _kv_formula(text) == 2 * (16 + 8) + 2 * (8 + 8)  # latent + rope per layer, the sliding ones narrower


def test_quantised_experts_reserve_the_dequantisation_workspace():
    """The copy stream dequantises a batch of misses beside the forward (models/quantised_fill.py):
    the plan sets that bound aside, out of the expert slots."""
    from dataclasses import replace

    from models.quantised_fill import DEQUANT_WORKSPACE_BYTES

    request = PlanRequest(device="cuda", gpu_memory="24GiB", host_memory="32GiB", max_model_len=4096,
                          max_concurrency=4)
    dense = facts("qwen3-30b-a3b")
    quantised = replace(dense, quantised_experts=True, host_entry_bytes=dense.expert_bytes // 2)
    p, q = (plan_memory(f, request, H200, HOST) for f in (dense, quantised))
    assert q.workspace_bytes - p.workspace_bytes == DEQUANT_WORKSPACE_BYTES
    assert q.expert_cache_bytes < p.expert_cache_bytes and q.kv_cache_bytes == p.kv_cache_bytes
