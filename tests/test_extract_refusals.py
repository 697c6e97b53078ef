"""A family cadre cannot serve is refused at extraction, exit 2, with one line saying why,
before anything is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from extractor import ExtractError
from extractor.__main__ import main
from extractor.families import FAMILIES
from extractor.layout import describe
from tiny_models import make_checkpoint


def refused(capsys, tmp_path, ckpt) -> str:
    capsys.readouterr()  # the checkpoint builder's progress bars
    code = main(["--model", str(ckpt), "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert not (tmp_path / "store").exists()
    return err[0]


def test_a_family_without_a_routing_kind_is_refused(tmp_path, capsys, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    monkeypatch.delitem(FAMILIES, "qwen3_moe")  # as a family cadre has not read yet would be
    assert "model_type 'qwen3_moe': cadre has no routing kind for it" in refused(capsys, tmp_path, ckpt)


def test_an_unknown_tensor_inside_the_experts_is_refused(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.experts.3.gate_proj.weight_absmax"] = torch.ones(2)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, tmp_path, ckpt)
    assert "weight_absmax" in line and "cadre does not know" in line


def test_quantised_weights_without_their_scales_are_refused(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    tensors = load_file(ckpt / "model.safetensors")
    key = "model.layers.1.mlp.experts.3.gate_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert "different dtypes" in refused(capsys, tmp_path, ckpt)


@pytest.mark.parametrize("model_type, says", [
    ("nemotron_h", "experts without a gate projection"),
    ("llama", "not an MoE model"),
])
def test_layouts_cadre_cannot_hold_are_refused_in_one_line(model_type, says):
    with pytest.raises(ExtractError, match=says) as raised:
        describe(AutoConfig.for_model(model_type))
    assert "\n" not in str(raised.value)
