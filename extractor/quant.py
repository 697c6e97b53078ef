"""FP8 e4m3 block quantisation of a dense expert weight, as transformers' own quantiser does it.

Same arithmetic as `transformers.integrations.finegrained_fp8.Fp8Quantize` (tested
against it): per [bm, bn] block, scale = 448 / max|w| (1 for an all-zero block), the
weight is w * scale clamped to +-448 and cast to float8_e4m3fn, and the stored
`weight_scale_inv` is 1 / scale in float32. Dequantising is fp8 * scale_inv per block.
"""

from __future__ import annotations

import torch

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (out, in divisible by block) -> (float8_e4m3fn [out, in], float32 scale_inv [out/bm, in/bn])."""
    block_m, block_n = block
    rows, cols = weight.shape
    tiles = weight.to(torch.float32).reshape(rows // block_m, block_m, cols // block_n, block_n)
    max_abs = tiles.abs().amax(dim=(1, 3))  # [R,C]
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = FP8_MAX / safe
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inv_scales = (1.0 / scales).to(torch.float32)
    scaled = tiles * scales.unsqueeze(-1).unsqueeze(1)  # [R,bm,C,bn]
    quantized = torch.clamp(scaled, min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.reshape(rows, cols), inv_scales
