"""Hostile and malformed requests for the soak test (and anyone probing a server).

`hostile_cases()` is a fixed list of requests a server must refuse cleanly: malformed JSON,
wrong types, values past their ranges (the 2^64 seed that once leaked a batch slot), unknown
parameters, prompts past the context window, token ids outside the vocabulary, deep nesting,
oversize bodies, wrong methods and paths. `mutations(rng, bodies)` derives endless variants
of valid bodies: keys dropped, values swapped for hostile ones, unknown keys added, the JSON
cut short. Every answer must be a 4xx in OpenAI's error shape, or -- when a mutation happens
to be valid -- a 200; never a 5xx.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    name: str
    method: str
    path: str
    body: bytes | None
    content_type: str = "application/json"


HOSTILE_VALUES = [None, True, False, 0, -1, 1.5, 1e308, -1e308, 2**64, 2**70, -(2**63), "", "x" * 5000,
                  "\u0000", "\ud7ff\ue000 💥", [], [[]], {}, {"a": {"b": {"c": {}}}}, [1] * 600, ["a"] * 50,
                  [-5], [[10**9]], "NaN", 0.0, 16, 10**6]
RAW_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"00012", b"0x10"]


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def hostile_cases(model: str, max_body_bytes: int = 1 << 20) -> list[Probe]:
    chat = [{"role": "user", "content": "hi"}]
    cases = [
        Probe("malformed json", "POST", "/v1/completions", b'{"model": "m", "prompt": "hi", '),
        Probe("not an object", "POST", "/v1/completions", b'["hi"]'),
        Probe("empty body", "POST", "/v1/chat/completions", b""),
        Probe("wrong content type", "POST", "/generate", b"prompt=hi", "application/x-www-form-urlencoded"),
        Probe("seed past 2^64-1 (generate)", "POST", "/generate",
              body(prompt="x", max_new_tokens=2, temperature=1, seed=2**64)),
        Probe("seed past 2^64-1 (completions)", "POST", "/v1/completions",
              body(model=model, prompt="x", max_tokens=2, seed=2**64)),
        Probe("seed past 2^64-1 (chat)", "POST", "/v1/chat/completions",
              body(model=model, messages=chat, max_tokens=2, seed=2**64)),
        Probe("max_new_tokens true", "POST", "/generate", body(prompt="x", max_new_tokens=True)),
        Probe("temperature Infinity", "POST", "/generate", b'{"prompt": "x", "temperature": Infinity}'),
        Probe("temperature NaN", "POST", "/v1/completions",
              b'{"model": "%s", "prompt": "x", "temperature": NaN}' % model.encode()),
        Probe("trace yes", "POST", "/generate", body(prompt="x", trace="yes")),
        Probe("unknown parameter", "POST", "/v1/completions", body(model=model, prompt="x", frobnicate=1)),
        Probe("unknown model", "POST", "/v1/completions", body(model="gpt-4", prompt="x")),
        Probe("prompt past the context", "POST", "/v1/completions",
              body(model=model, prompt="To be, or not to be " * 400, max_tokens=4)),
        Probe("token id outside the vocabulary", "POST", "/v1/completions",
              body(model=model, prompt=[[1, 2, 10**9]], max_tokens=2)),
        Probe("logit_bias outside the vocabulary", "POST", "/v1/completions",
              body(model=model, prompt="x", logit_bias={str(10**9): 5})),
        Probe("negative max_tokens", "POST", "/v1/completions", body(model=model, prompt="x", max_tokens=-3)),
        Probe("n past its bound", "POST", "/v1/chat/completions", body(model=model, messages=chat, n=10**6)),
        Probe("tools", "POST", "/v1/chat/completions",
              body(model=model, messages=chat, tools=[{"type": "function", "function": {"name": "f"}}])),
        Probe("deeply nested", "POST", "/v1/completions",
              b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        Probe("many keys", "POST", "/v1/completions", json.dumps({f"k{i}": i for i in range(5000)}).encode()),
        Probe("oversize body", "POST", "/v1/completions", body(model=model, prompt="x" * (max_body_bytes + 10))),
        Probe("invalid utf-8", "POST", "/v1/completions", b'{"model": "m", "prompt": "\xff\xfe"}'),
        Probe("wrong method", "GET", "/v1/completions", None),
        Probe("unknown path", "POST", "/v1/engines/davinci/completions", body(prompt="x")),
        Probe("detokenize outside the vocabulary", "POST", "/detokenize", body(tokens=[10**9])),
    ]
    for raw in RAW_NUMBERS:
        cases.append(Probe(f"raw number {raw.decode()}", "POST", "/v1/completions",
                           b'{"model": "%s", "prompt": "x", "top_p": %s}' % (model.encode(), raw)))
    return cases


def mutations(rng: random.Random, valid: list[tuple[str, dict]]):
    """Endless mutated variants of valid (path, body) pairs."""
    while True:
        path, original = rng.choice(valid)
        mutated = json.loads(json.dumps(original))
        operator = rng.randrange(5)
        if operator == 0 and mutated:
            mutated.pop(rng.choice(list(mutated)))
        elif operator == 1 and mutated:
            mutated[rng.choice(list(mutated))] = rng.choice(HOSTILE_VALUES)
        elif operator == 2:
            mutated[rng.choice(["extra", "best_of", "logprobs", "n", "echo", "suffix", "stop", "max_tokens",
                                "stream_options", "response_format", "top_logprobs", "min_tokens"])] = \
                rng.choice(HOSTILE_VALUES)
        elif operator == 3:
            text = json.dumps(mutated).encode()
            yield Probe("truncated", "POST", path, text[:rng.randrange(max(1, len(text)))])
            continue
        else:
            mutated = rng.choice(HOSTILE_VALUES)
        yield Probe(f"mutation {operator}", "POST", path, json.dumps(mutated).encode())
