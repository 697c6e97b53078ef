"""The ingress's prompt -> experts prediction, attached to a forwarded request for the router.

Only the generation endpoints carry a prompt; anything else (or a body the replica will
reject anyway) gets no prediction, and the router places it by queue length alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from router.token_profile import TokenProfile

PROMPT_PATHS = {"/generate": "prompt", "/v1/completions": "prompt", "/v1/chat/completions": "messages"}
MAX_PREDICT_TOKENS = 2048  # a prompt's tail: enough to know how it routes, bounded work per request


def prompt_of(path: str, body: bytes) -> str | list[int] | None:
    field = PROMPT_PATHS.get(path)
    if field is None:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = data.get(field) if isinstance(data, dict) else None
    if field == "messages":
        return chat_text(value)
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, int) for t in value)):
        return value
    return None


def chat_text(messages) -> str | None:
    if not isinstance(messages, list):
        return None
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts) or None


class PromptPredictor:
    def __init__(self, profile: TokenProfile, tokenizer):
        self.profile, self.tokenizer = profile, tokenizer

    @classmethod
    def load(cls, profile_path: str | Path, tokenizer_dir: str | Path) -> "PromptPredictor":
        from transformers import AutoTokenizer

        return cls(TokenProfile.load(profile_path), AutoTokenizer.from_pretrained(tokenizer_dir))

    def predict(self, path: str, body: bytes) -> tuple[list[list[float]], list[int]] | None:
        """(prediction [M][E], its MoE layers), or None without a usable prompt."""
        prompt = prompt_of(path, body)
        if not prompt:
            return None
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        return self.profile.predict(ids[-MAX_PREDICT_TOKENS:]), self.profile.layers
