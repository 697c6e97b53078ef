"""Expert shards in the store's format -> dense [out, in] weights the experts path computes on.

The host and disk tiers keep a shard's bytes as the store has them (quantised where the
store is), so a miss moves the quantised size; these functions run on the device after
the copy. Their arithmetic is transformers' own for the same formats, so an expert
dequantised here equals transformers' dequantised load of the same checkpoint bit for bit
(tests/test_expert_format.py):

  fp8    `Fp8Dequantize._dequantize_one` (finegrained_fp8.py): fp8 -> float32, times the
         float32 block scale, cast to the model dtype
  mxfp4  `_convert_moe_packed_tensors` (mxfp4.py): e2m1 nibbles (low first) looked up in
         the model dtype, then ldexp by the e8m0 exponent - 127; output rows first

Legend: O output features, N input features, G = N/32 scale groups, R/C scale grid.
"""

from __future__ import annotations

import torch

from extractor.formats import DENSE, FP8, MXFP4, PROJECTIONS, SCALE_SUFFIX

# e2m1 code -> value (sign bit 8); transformers' FP4_VALUES
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dense_weights(fmt: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{gate_proj, up_proj, down_proj: [O, N] in dtype} (+ "<proj>_bias" [O] when the shard has them)."""
    weights = fmt["weights"]
    if weights == DENSE:
        out = {name: tensors[name].to(dtype) for name in PROJECTIONS}
    elif weights in SCALE_SUFFIX:
        out = {name: dequantize(weights, tensors[name], tensors[name + SCALE_SUFFIX[weights]], dtype)
               for name in PROJECTIONS}
    else:
        raise ValueError(f"unknown expert weight format {weights!r}")
    for name in PROJECTIONS:
        if name + "_bias" in tensors:
            out[name + "_bias"] = tensors[name + "_bias"].to(dtype)
    return out


def dequantize(weights: str, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantised weight [..., O, ...] and its scales -> dense [..., O, N] in dtype (any leading dims)."""
    if weights == FP8:
        return dequantize_fp8(weight, scale, dtype)
    if weights == MXFP4:
        return dequantize_mxfp4(weight, scale, dtype)
    raise ValueError(f"unknown quantised weight format {weights!r}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn [..., O, N] with float32 scale_inv [..., R, C] (O/R x N/C blocks) -> [..., O, N] in dtype."""
    rows, cols = weight.shape[-2:]
    scale_rows, scale_cols = scale_inv.shape[-2:]
    if rows % scale_rows or cols % scale_cols:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} is not divisible by its scale grid {tuple(scale_inv.shape)}")
    q = weight.to(torch.float32).reshape(-1, scale_rows, rows // scale_rows, scale_cols, cols // scale_cols)
    s = scale_inv if scale_inv.dtype == torch.float32 else scale_inv.to(torch.float32)
    s = s.reshape(-1, scale_rows, 1, scale_cols, 1)  # [B,R,1,C,1]
    # the float32 product rounded once to dtype, as (q * s).to(dtype), in one kernel
    out = torch.mul(q, s, out=torch.empty(q.shape, dtype=dtype, device=q.device))
    return out.reshape(weight.shape)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks [..., O, G, 16] and e8m0 scales [..., O, G] -> [..., O, G*32] in dtype."""
    assert blocks.shape[:-1] == scales.shape, f"blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    *prefix, groups, width = blocks.shape
    flat = blocks.reshape(-1, width)  # [rows, 16]
    exponents = scales.to(torch.int32).reshape(-1, 1) - 127  # [rows, 1]
    out = torch.empty(flat.shape[0], width * 2, dtype=dtype, device=blocks.device)  # [rows, 32]
    out[:, 0::2] = lut[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(flat >> 4).to(torch.int)]
    torch.ldexp(out, exponents, out=out)
    return out.reshape(*prefix, groups * width * 2)
