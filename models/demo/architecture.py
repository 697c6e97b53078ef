"""The demo model's shape, and the dense baseline with the same active parameter count.

A fine-grained Qwen3-MoE in miniature: 8 layers of 32 experts, top-4 with renormalised
weights (as Qwen3-30B-A3B: 48 layers of 128, top-8). Sized so the bf16 checkpoint stays
under 25 MB: 11.9 M parameters, 3.7 M active per token.

The dense baseline is Qwen3 with intermediate_size = top_k * moe_intermediate_size, so its
MLP has exactly the parameters of the 4 experts a token activates; attention, embeddings
and norms are identical. The MoE's only extra active parameters are its routers.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3MoeConfig

VOCAB_SIZE = 8192
SEQ_LEN = 512  # training window; also max_position_embeddings, so nobody assumes more

SHARED = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=192,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    max_position_embeddings=SEQ_LEN,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
MOE = dict(
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    intermediate_size=4 * 64,  # unused (no dense layers), set to the baseline's so it misleads no one
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.01,
)


def moe_config(output_router_logits: bool = True) -> Qwen3MoeConfig:
    """The demo MoE; output_router_logits=True while training (the balancing loss needs them)."""
    return Qwen3MoeConfig(**SHARED, **MOE, output_router_logits=output_router_logits)


def dense_config() -> Qwen3Config:
    return Qwen3Config(**SHARED, intermediate_size=MOE["num_experts_per_tok"] * MOE["moe_intermediate_size"])


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and those one token uses (a top-k share of each layer's experts)."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    config = model.config
    if expert:
        active = total - expert + expert * config.num_experts_per_tok // config.num_experts
    else:
        active = total
    return {"total": total, "active": active, "experts": expert}
