"""The shipped demo model, loaded with stock transformers, predicts held-out Shakespeare.

The threshold sits well below what a model without the trained weights can reach: a
random model scores ~ln(8192) = 9.0 nats/token, the training split's unigram distribution
6.45 on the test plays, and the shipped weights with each layer's router rows shuffled
(every token sent to the wrong experts) 7.35; the shipped model scores 4.38 on these tokens
(4.23 over the whole test split, see README "Demo model").
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT
from models.demo.analyze import heldout_windows
from models.demo.evaluate import mean_nll

MAX_HELDOUT_NLL = 5.0  # nats/token over the first 4 x 512 tokens of Macbeth
NUM_WINDOWS = 4


@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    windows = heldout_windows(tokenizer, HELDOUT_TEST_TEXT, model.config.max_position_embeddings, NUM_WINDOWS)
    return model, windows


def test_shipped_model_predicts_heldout_plays(shipped):
    model, windows = shipped
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert mean_nll(model, windows, batch_size=NUM_WINDOWS) < MAX_HELDOUT_NLL


def test_threshold_rejects_a_random_model(shipped):
    model, windows = shipped
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    nll = mean_nll(random_model, windows[:1, :128])
    assert nll > MAX_HELDOUT_NLL
    assert abs(nll - math.log(model.config.vocab_size)) < 0.5  # an untrained model is near-uniform
