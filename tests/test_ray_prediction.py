"""The ingress predicts experts only from a generation endpoint's prompt (text, token ids or
chat messages); anything else leaves the router to queue lengths."""

import json

import torch

from router.token_profile import TokenProfile
from server.ray.prediction import PromptPredictor, prompt_of


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_prompts_come_from_the_generation_endpoints():
    assert prompt_of("/generate", body(prompt="Hark")) == "Hark"
    assert prompt_of("/v1/completions", body(prompt=[5, 6])) == [5, 6]
    chat = body(messages=[{"role": "system", "content": "Be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "Speak"}]}])
    assert prompt_of("/v1/chat/completions", chat) == "Be brief\nSpeak"
    assert prompt_of("/v1/models", body(prompt="x")) is None
    assert prompt_of("/generate", b"{not json") is None
    assert prompt_of("/generate", body(prompt=7)) is None


class Tokens:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 4 for c in text]}


def test_prediction_is_the_profile_of_the_prompt_tokens():
    experts = torch.tensor([[[0]], [[1]], [[2]], [[3]]], dtype=torch.int32)  # token t -> expert t, one layer
    profile = TokenProfile([0], 4, torch.arange(4, dtype=torch.int32), experts,
                           torch.ones(4, 1, 1, dtype=torch.float16), torch.full((1, 4), 0.25), tokens=4)
    predictor = PromptPredictor(profile, Tokens())
    prediction, layers = predictor.predict("/generate", body(prompt="\x01\x01"))
    assert layers == [0] and prediction == [[0.0, 1.0, 0.0, 0.0]]
    assert predictor.predict("/health", b"") is None
