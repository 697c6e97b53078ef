"""RuntimeConfig.gather_rows reaches every MoE layer's experts (the GPU's choice between gathering
a step's expert weights and a grouped matmul; bench decode --gather-rows A/Bs it), and a
negative one is refused before anything loads."""

import pytest

from models import Runtime, RuntimeConfig
from models.kernels import GATHER_ROWS
from models.loading import expert_layers
from server_live import tiny_checkpoint


def test_gather_rows_reaches_every_layer_and_defaults_to_the_kernels(tmp_path):
    from extractor import extract_store

    extract_store(tiny_checkpoint(tmp_path / "checkpoint"), tmp_path / "store", quiet=True)
    for given, want in ((None, GATHER_ROWS), (0, 0), (64, 64)):
        runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(gather_rows=given))
        assert {layer.gather_rows for layer in expert_layers(runtime.model).values()} == {want}
        runtime.close()


def test_a_negative_gather_rows_is_refused():
    with pytest.raises(ValueError, match="gather_rows must be >= 0"):
        RuntimeConfig(gather_rows=-1)
