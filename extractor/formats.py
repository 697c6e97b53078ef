"""What an expert shard holds, per weight format (the manifest's "expert_format").

Every shard holds `gate_proj`, `up_proj`, `down_proj` for output features first
([out, in] for dense and FP8 weights), and where the format or family has them:

  dense   weights in a float dtype                       (no extra tensors)
  fp8     float8_e4m3fn weights + `<proj>_scale_inv`      float32 [ceil(out/bm), ceil(in/bn)]:
          DeepSeek-V3 / Qwen3-FP8 block scales (weight = fp8 * scale_inv per block)
  mxfp4   `<proj>` uint8 blocks [out, in/32, 16] (two e2m1 values a byte, low nibble
          first) + `<proj>_scales` uint8 [out, in/32] (e8m0 exponents, bias 127): gpt-oss
  + `<proj>_bias` [out] when the family's experts have biases (gpt-oss)

A store whose manifest has no "expert_format" is dense without biases (format 1 stores).
"""

from __future__ import annotations

DENSE, FP8, MXFP4 = "dense", "fp8", "mxfp4"
WEIGHT_FORMATS = (DENSE, FP8, MXFP4)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = {FP8: "_scale_inv", MXFP4: "_scales"}
MXFP4_BLOCK = 32  # weights per e8m0 scale
FP8_DTYPE = "F8_E4M3"


def tensor_names(weights: str, bias: bool) -> list[str]:
    """Shard tensor names in file order: weights, then scales, then biases."""
    names = list(PROJECTIONS)
    if weights in SCALE_SUFFIX:
        names += [p + SCALE_SUFFIX[weights] for p in PROJECTIONS]
    if bias:
        names += [p + "_bias" for p in PROJECTIONS]
    return names


def weight_format(dtypes: dict[str, str]) -> str:
    """The format of one expert from its tensors' safetensors dtypes {name: dtype}."""
    if "gate_proj_scale_inv" in dtypes:
        return FP8
    if "gate_proj_scales" in dtypes:
        return MXFP4
    return DENSE


def manifest_entry(weights: str, bias: bool, block_size: list[int] | None) -> dict | None:
    """The manifest's "expert_format", or None for a plain dense store (read as format 1)."""
    if weights == DENSE and not bias:
        return None
    entry = {"weights": weights, "tensors": tensor_names(weights, bias)}
    if weights == FP8:
        entry["block_size"] = list(block_size)
    return entry


def expected_shapes(weights: str, intermediate: int, hidden: int, block: list[int] | None) -> dict[str, tuple]:
    """Shapes every shard tensor must have for experts of [I, H]."""
    out_in = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    shapes = {}
    for name, (out, inp) in out_in.items():
        if weights == MXFP4:
            shapes[name] = (out, inp // MXFP4_BLOCK, MXFP4_BLOCK // 2)
            shapes[name + "_scales"] = (out, inp // MXFP4_BLOCK)
        else:
            shapes[name] = (out, inp)
        if weights == FP8:
            shapes[name + "_scale_inv"] = (-(-out // block[0]), -(-inp // block[1]))
        shapes[name + "_bias"] = (out,)
    return shapes
