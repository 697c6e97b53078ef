"""Tiny random MoE checkpoints built with transformers itself, one per supported family.

Shared by the extractor, runtime, router and server tests: real config.json and
safetensors formats, random weights, small enough to build in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small, but each keeps its family's distinctive structure: Qwen2-MoE's shared expert
# and gate, DeepSeek-V3's dense first layer, groups and correction bias, Mixtral's
# block_sparse_moe/w1,w2,w3 keys on disk.
FAMILY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, vocab_size=128,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, vocab_size=128,
    ),
    "mixtral": dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2, vocab_size=128,
    ),
    "olmoe": dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, vocab_size=128,
        eos_token_id=1, pad_token_id=0, bos_token_id=2,
    ),
    "deepseek_v3": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=128,
    ),
}

# Beyond the first six: each keeps what makes its family different -- gpt-oss's biases,
# clamped SwiGLU, attention sinks and sliding layers (fused, transposed, interleaved
# experts on disk); GLM-4-MoE's and DeepSeek-V2's groups; PhiMoE's sparsemixer; Granite's
# fused input_linear; MiniMax's and Qwen3-Next's linear-attention layers (Qwen3-Next's
# shared expert); Jamba's Mamba layers with MoE every other layer; LFM2-MoE's conv layers
# and expert bias.
# Shared by the tiny configs below: DeepSeek's multi-head latent attention at tiny size, and the
# vocabulary with its special tokens.
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
TOKENS = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
NEW_FAMILY_CONFIGS: dict[str, dict] = {
    "glm4_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        norm_topk_prob=True, vocab_size=128, use_qk_norm=True),
    "gpt_oss": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=16, num_experts_per_tok=4, vocab_size=128,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "deepseek_v2": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, vocab_size=128),
    "phimoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2, vocab_size=128),
    "granitemoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, vocab_size=128),
    "minimax": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=16, num_experts_per_tok=2, vocab_size=128,
        block_size=4, layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen3_next": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=16,
        num_experts_per_tok=4, vocab_size=128),
    "jamba": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=2, vocab_size=128, attn_layer_period=2,
        attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, use_mamba_kernels=False,
        mamba_d_state=4, mamba_expand=2),
    "lfm2_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, num_dense_layers=1,
        vocab_size=128, layer_types=["conv", "full_attention", "conv"]),
    # Routers shared with a family above; what each keeps of its own: FlexOlmo's OLMoE-style layers,
    # Granite's shared expert (and the hybrid's Mamba layers, whose time_step_limit holds an infinity
    # in config.json), GLM-4.7-Flash's MLA attention and dense first layer, EXAONE's sliding layers.
    "flex_olmo": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, **TOKENS),
    "granitemoeshared": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, shared_intermediate_size=32,
        **TOKENS),
    "granitemoehybrid": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, shared_intermediate_size=32,
        **TOKENS, mamba_n_heads=4, mamba_d_state=16,
        mamba_chunk_size=16, layer_types=["mamba", "attention", "mamba", "attention"]),
    "glm4_moe_lite": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        **MLA, n_group=4,
        topk_group=2, **TOKENS,
        mlp_layer_types=["dense", "sparse", "sparse"]),
    "exaone_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, **TOKENS,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # DeepSeek-V3's router: V3.2's indexed attention, dots1's plain attention, Kimi-Linear's linear-attention
    # layers (its config's own key names); Qwen3.5-MoE's text model with its linear-attention layers
    "deepseek_v32": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, **MLA, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        **TOKENS, layer_types=["indexed_attention"] * 4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "dots1": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        **TOKENS, layer_types=["full_attention"] * 4),
    "kimi_linear": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_experts=16, num_experts_per_token=4,
        num_expert_group=4, topk_group=2, routed_scaling_factor=2.5, **MLA, linear_head_dim=8, linear_num_heads=4,
        **TOKENS,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "axk1": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, **MLA,
        n_group=4, topk_group=2, **TOKENS,
        mlp_layer_types=["dense", "sparse", "sparse"]),
    "bailing_hybrid": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, **MLA,
        first_k_dense_replace=1, **TOKENS,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "glm_moe_dsa": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, **MLA,
        n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, index_head_dim=16,
        index_n_heads=2, index_topk=8, **TOKENS,
        layer_types=["indexed_attention"] * 4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "hy_v4": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, **MLA,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, swiglu_limit=0.5, index_head_dim=16, index_n_heads=2,
        index_topk=8, **TOKENS,
        layer_types=["indexed_attention"] * 4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "hy_v3": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4,
        router_scaling_factor=2.826, **TOKENS,
        mlp_layer_types=["dense", "sparse", "sparse"]),
    "granitemoe_swa": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, sliding_window=8, **TOKENS,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]),
    # Flint's sinks and sliding layers; Laguna with its router's logit soft-cap on (and its block's own scale)
    "flint": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4,
        shared_expert_intermediate_size=32, mlp_only_layers=[0], sliding_window=8, **TOKENS,
        layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"]),
    "laguna": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4,
        shared_expert_intermediate_size=32, sliding_window=8, moe_router_logit_softcapping=1.0,
        moe_routed_scaling_factor=2.5, **TOKENS,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # Qwen3-MoE's, GLM's and DeepSeek-V3's routers under other names; Lara-Mini's float32 router logits;
    # Qwen4-Exp's text model with its indexed attention (its default config leaves the indexer unset)
    "mellum": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=16, num_experts_per_tok=4,
        **TOKENS, layer_types=["full_attention"] * 4, mlp_layer_types=["sparse"] * 4),
    "solar_open": dict(hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, **TOKENS),
    "mimo_v2_flash": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, v_head_dim=8, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, **TOKENS,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "lara_mini": dict(hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=32,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        **TOKENS,
        layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
    "qwen4_exp_text": dict(hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=32,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
        **TOKENS,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "indexed_attention"]),
    "qwen3_5_moe_text": dict(hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16,
        num_experts_per_tok=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, **TOKENS,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"]),
    # MiniMax-M2: sigmoid routing with the block's correction bias (its own kind); Cohere2-MoE as the real
    # checkpoints configure it: sigmoid selection, renormalised (tests/test_routing_selection_fn.py: softmax)
    "minimax_m2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=16, num_experts_per_tok=4, **TOKENS),
    "cohere2_moe": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4, **TOKENS,
        expert_selection_fn="sigmoid", norm_topk_prob=True,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["sparse"] * 4),
    # HunYuan-MoE: a float32 router in gate.wg, top-k given per layer as the published configs give it
    "hunyuan_v1_moe": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=16, moe_topk=[4, 4, 4], **TOKENS),
    # ERNIE 4.5: its own routing kind (softmax_bias_topk), a dense first layer, moe_* config keys
    "ernie4_5_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, moe_num_experts=16, moe_k=4, **TOKENS),
    # AFMoE: its router's linear in router.gate, the block's float32 expert bias, route_scale, a dense first
    # layer and sliding layers; A.X-K2 with expert groups (unchosen groups score 0.0) and indexed MLA
    # attention; Beam: sorted group-limited top-k, the block scaling; Kolibri: top-k of biased logits
    "afmoe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16,
        num_experts_per_tok=4, num_shared_experts=1, route_scale=2.5, global_attn_every_n_layers=2,
        sliding_window=8, **TOKENS),
    "axk2": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, **MLA, n_group=4, topk_group=2, routed_scaling_factor=2.5, index_head_dim=16,
        index_n_heads=2, index_topk=8, **TOKENS, mlp_layer_types=["dense", "sparse", "sparse"]),
    "beam": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, sliding_window=8, **TOKENS,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # DeepSeek-V4: a hash-routed first MoE layer (experts from a token-id table), then sqrt(softplus)
    # scores with a correction bias; hyper-connections and compressed attention stay transformers'
    "deepseek_v4": dict(hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, qk_rope_head_dim=8, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=8,
        index_topk=8, sliding_window=8, hc_mult=2, num_nextn_predict_layers=0, routed_scaling_factor=1.5,
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}, **TOKENS,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"] * 2,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"]),
    # ZAYA: an MLP router carrying state from layer to layer, top-1 with a "skip" class (kept as transformers'
    # own: the "native" kind), hybrid CCA attention
    "zaya": dict(hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=1, router_hidden_size=16, **TOKENS),
    # dots.note 3's text model: DeepSeek-V3's routing; indexed MLA layers, then sliding layers with fewer heads
    "dots3_note_text": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, **MLA, head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=2,
        sliding_window=8, shared_experts_intermediate_size=16, routed_scaling_factor=2.5, **TOKENS,
        swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_q_lora_rank=16, swa_kv_lora_rank=16,
        swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8),
    "kolibri1": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, moe_intermediate_size=16, num_local_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
        shared_expert_intermediate_size=32, sliding_window=8, **TOKENS,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
}
FAMILY_CONFIGS.update(NEW_FAMILY_CONFIGS)

FIRST_SIX = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")  # + the thinker (extract_helpers)
NEW_FAMILIES = tuple(NEW_FAMILY_CONFIGS)
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_config(family: str, **overrides):
    kwargs = {**FAMILY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random model of the family; router biases randomised so they matter in tests."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.2)  # HF's init std (0.02) makes routing near-uniform
        for name, buf in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                buf.normal_(0.0, 0.1)
            if name.endswith("tid2eid"):  # DeepSeek-V4's token -> experts table: k distinct experts a token
                experts = model.config.num_local_experts
                buf.copy_(torch.stack([torch.randperm(experts)[: buf.shape[1]] for _ in range(buf.shape[0])]))
    return model.eval()


def make_checkpoint(
    path: Path,
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    fused: bool = False,
    **overrides,
) -> Path:
    """Save a tiny random model of `family` at `path` as transformers would.

    fused=True keeps experts as 3D tensors (save_original_format=False);
    max_shard_size shards the checkpoint with an index.json.
    """
    model = tiny_model(family, seed=seed, dtype=dtype, **overrides)
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    if fused:
        kwargs["save_original_format"] = False
    model.save_pretrained(path, **kwargs)
    return Path(path)


QWEN_VISION = dict(vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32))
# the other towers of each published multimodal checkpoint, tiny (dots.note 3's vision encoder has experts too)
OTHER_TOWERS = {
    "qwen3_5_moe": QWEN_VISION,
    "qwen4_exp": QWEN_VISION,
    "dots3_note": dict(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=2, moe_intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                           adapter_in_dim=16, adapter_out_dim=32, spatial_merge_size=2, adapter_merge_size=2,
                           mlp_layer_types=["sparse"]),
        audio_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=8, adapter_input_size=16, adapter_out_dim=32,
                          downsample_hidden_size=16)),
}


def tiny_multimodal_config(family: str):
    """A multimodal config whose text model is the tiny `<family>_text` one, its other towers tiny."""
    return AutoConfig.for_model(family, text_config=dict(FAMILY_CONFIGS[f"{family}_text"]), **OTHER_TOWERS[family])


def make_multimodal_checkpoint(path: Path, family: str = "qwen3_5_moe", seed: int = 0) -> Path:
    """A tiny multimodal checkpoint as published (Qwen3.5-MoE, Qwen4-Exp: model.language_model.* beside
    model.visual.*; dots.note 3: model.* beside vision_encoder.* and audio_encoder.*), its text model the
    tiny `<family>_text` one."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_multimodal_config(family)).float()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.eval().save_pretrained(path)
    return Path(path)

