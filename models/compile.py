"""Opt-in torch.compile of a decode step's pure-tensor leaves (RuntimeConfig(compile=True)).

A captured decode step still runs every kernel the eager code launches: about 75 per MoE
layer of Qwen3-30B-A3B, most of them small elementwise ones (RMSNorm alone is seven), so
at batch 1 the step is bound by kernel count, not by bytes. Compiling the leaves fuses them:
the norms, the router gate with cadre's routing, and the experts' compute. Whole-forward
compilation is not used: the forward holds the host work of a miss-capable layer, and the
leaves are where the kernels are.

The leaves are compiled, not rewritten, so the numerics are inductor's: fused elementwise
ops round once instead of after every op, which in bfloat16 can move a logit by an ulp and,
rarely, a greedy token. That is why it is opt-in; bench decode measures both.
"""

from __future__ import annotations

import torch

from .loading import expert_layers, keeps_own_router, moe_blocks, router_of


def compile_hot_paths(model, spec) -> None:
    """Compile the norms, router gates and experts' compute of `model` in place (lazily:
    each compiles on its first call, which must not be inside a CUDA graph capture; the
    decoder's first step of every shape runs eagerly first)."""
    layers = len(moe_blocks(model)) + 1
    # One gate forward per layer (a closure over its layer index): raise dynamo's
    # per-code-object cache so deep models do not fall back to eager after eight.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * layers)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit,
                                                            16 * layers)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = torch.compile(module.forward)
    for block in moe_blocks(model).values():
        if keeps_own_router(block, spec):  # transformers' router, left as it is
            continue
        router = router_of(block)
        router.forward = torch.compile(router.forward)
    compiled_mlp = torch.compile(expert_layers(model)[next(iter(expert_layers(model)))].mlp)
    for layer in expert_layers(model).values():
        layer.mlp = compiled_mlp
