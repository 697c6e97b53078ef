"""Tiny quantised checkpoints in the layouts people download, built from tiny_models.py.

FP8: every decoder-layer linear weight (experts, attention, shared MLPs; routers and
lm_head stay as they are) quantised by transformers' own `Fp8Quantize` into an
float8_e4m3fn weight + float32 `weight_scale_inv`, with DeepSeek-V3's / Qwen3-FP8's
quantization_config. MXFP4: gpt-oss's `*_blocks` (uint8 [E, out, in/32, 16]) and
`*_scales` (uint8 [E, out, in/32]) with random bytes: any bytes are a valid MXFP4 tensor,
and the tests compare against transformers' dequantisation of the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiny_models import make_checkpoint

FP8_BLOCK = [8, 8]  # divides every tiny expert and attention shape
_NOT_QUANTISED = ("mlp.gate.weight", "router.weight", "lm_head", "embed_tokens", "norm")


def make_fp8_checkpoint(path: Path, family: str, block=FP8_BLOCK, **kwargs) -> Path:
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    path = make_checkpoint(Path(path), family, dtype=torch.bfloat16, **kwargs)
    config = FineGrainedFP8Config(weight_block_size=list(block))
    quantize = Fp8Quantize(FineGrainedFP8HfQuantizer(config))
    tensors = load_file(path / "model.safetensors")
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.dim() == 2 and ".layers." in key and not any(
                part in key for part in _NOT_QUANTISED):
            out.update(quantize.convert({key: tensor}))
        else:
            out[key] = tensor
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors", metadata={"format": "pt"})
    _set_quantization_config(path, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(block)})
    return path


def make_mxfp4_checkpoint(path: Path, seed: int = 0, **kwargs) -> Path:
    """gpt-oss with MXFP4 experts (biases stay bf16), as openai/gpt-oss-* ship them."""
    path = make_checkpoint(Path(path), "gpt_oss", dtype=torch.bfloat16, **kwargs)
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inp, outp = tensor.shape  # gpt-oss keeps [E, in, out]; MXFP4 is output-first
            groups = inp // 32
            out[key + "_blocks"] = torch.randint(0, 256, (experts, outp, groups, 16), generator=generator,
                                                 dtype=torch.uint8)
            # exponents near 2^-4..2^-1: values of the order of the bf16 weights they replace
            out[key + "_scales"] = torch.randint(123, 127, (experts, outp, groups), generator=generator,
                                                 dtype=torch.uint8)
        else:
            out[key] = tensor
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    _set_quantization_config(path, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return path


def _set_quantization_config(path: Path, quantization_config: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
