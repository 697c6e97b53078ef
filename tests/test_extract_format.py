"""The extractor's own safetensors header reader and streaming writer agree with the
safetensors library on every dtype and on odd shapes (scalars, empty tensors)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from extract_helpers import raw_bytes, same_bits
from extractor.safetensors_format import TORCH_NAMES, SafetensorsFormatError, encode_header, read_header

ODD_TENSORS = {
    "scalar": torch.tensor(3.5, dtype=torch.float32),
    "empty": torch.zeros(0, 7, dtype=torch.bfloat16),
    "flags": torch.tensor([True, False, True]),
    "positions": torch.arange(5, dtype=torch.int64),
    "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
    "half": torch.randn(3, 2, 2, dtype=torch.float16),
    "bytes": torch.arange(9, dtype=torch.uint8),
}


def test_reader_matches_the_library(tmp_path):
    save_file(ODD_TENSORS, tmp_path / "a.safetensors")
    infos = {t.name: t for t in read_header(tmp_path / "a.safetensors")}
    raw = (tmp_path / "a.safetensors").read_bytes()
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert set(infos) == set(f.keys())
        for name, info in infos.items():
            tensor = f.get_tensor(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == TORCH_NAMES[str(tensor.dtype)[6:]]
            assert raw[info.begin:info.begin + info.nbytes] == raw_bytes(tensor)


def test_writer_output_loads_in_the_library(tmp_path):
    names = list(ODD_TENSORS)
    header = encode_header([(n, TORCH_NAMES[str(t.dtype)[6:]], tuple(t.shape)) for n, t in ODD_TENSORS.items()])
    assert len(header) % 8 == 0  # tensor data starts aligned, as the library writes it
    with open(tmp_path / "b.safetensors", "wb") as f:
        f.write(header)
        for name in names:
            f.write(raw_bytes(ODD_TENSORS[name]))
    with safe_open(tmp_path / "b.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(same_bits(f.get_tensor(n), ODD_TENSORS[n]) for n in names)
    assert [t.name for t in read_header(tmp_path / "b.safetensors")] == names


@pytest.mark.parametrize("tamper, says", [
    (lambda raw: raw + b"\0", "trailing bytes"),
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw[:5], "not even a header length"),
])
def test_reader_refuses_what_the_library_refuses(tmp_path, tamper, says):
    save_file({"w": torch.ones(4, 4)}, tmp_path / "c.safetensors")
    (tmp_path / "c.safetensors").write_bytes(tamper((tmp_path / "c.safetensors").read_bytes()))
    with pytest.raises(SafetensorsFormatError, match=says):
        read_header(tmp_path / "c.safetensors")
    with pytest.raises(Exception):
        with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
            f.get_tensor("w")
