"""The soak test's valid requests: one template per kind, and how two answers to it compare.

Each template is concrete (prompt, sampling, seed), so its answer is deterministic: the
soak records it once, alone, and every later answer -- batched with other traffic,
streamed or not -- must equal it: texts, token strings and finish reasons exactly, usage
exactly, logprobs within LOGPROB_TOLERANCE (batched forwards round differently).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

SERVED = "cadre-demo"
LOGPROB_TOLERANCE = 1e-3


@dataclass
class Template:
    name: str
    path: str
    body: dict
    streams: bool = True  # may also be sent with stream: true
    reference: dict | None = None


VERDICT = {"type": "object", "properties": {"guilty": {"type": "boolean"},
                                            "crime": {"type": "string", "enum": ["murder", "treason", "none"]}},
           "required": ["guilty", "crime"], "additionalProperties": False}


def prompts() -> list[str]:
    from models.demo import HELDOUT_TEST_TEXT

    lines = [line.strip() for line in HELDOUT_TEST_TEXT.read_text().splitlines() if len(line.strip()) > 30]
    return lines[::max(1, len(lines) // 12)][:12]


def templates(ids: list[list[int]], texts: list[str]) -> list[Template]:
    """Every kind of valid request, each concrete (its answer is deterministic)."""
    m = {"model": SERVED}
    chat = [{"role": "system", "content": "Speak as a player."}, {"role": "user", "content": texts[5]}]
    return [
        Template("completion", "/v1/completions", {**m, "prompt": texts[0], "max_tokens": 24, "temperature": 0}),
        Template("completion list", "/v1/completions", {**m, "prompt": texts[1:3], "max_tokens": 16,
                                                         "temperature": 0}),
        Template("completion token ids", "/v1/completions", {**m, "prompt": ids[3], "max_tokens": 16,
                                                              "temperature": 0}),
        Template("completion token-id lists", "/v1/completions", {**m, "prompt": ids[4:6], "max_tokens": 12,
                                                                   "temperature": 0}),
        Template("echo score (lm-eval)", "/v1/completions", {**m, "prompt": [ids[6]], "max_tokens": 1, "echo": True,
                                                              "logprobs": 1, "temperature": 0, "seed": 1234}),
        Template("echo only", "/v1/completions", {**m, "prompt": ids[7], "max_tokens": 0, "echo": True,
                                                   "logprobs": 2}),
        Template("n seeded", "/v1/completions", {**m, "prompt": texts[8], "n": 3, "temperature": 0.9, "seed": 7,
                                                  "max_tokens": 16}),
        Template("best_of", "/v1/completions", {**m, "prompt": texts[9], "best_of": 3, "temperature": 1.0,
                                                 "seed": 3, "max_tokens": 12}, streams=False),
        Template("penalties bias min_tokens", "/v1/completions",
                 {**m, "prompt": texts[10], "max_tokens": 20, "temperature": 0, "repetition_penalty": 1.3,
                  "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {str(ids[10][0]): 3.0},
                  "min_tokens": 8}),
        Template("ignore_eos", "/v1/completions", {**m, "prompt": texts[11], "max_tokens": 32, "ignore_eos": True,
                                                    "temperature": 0}),
        Template("stop strings and ids", "/v1/completions",
                 {**m, "prompt": texts[0], "max_tokens": 32, "temperature": 0, "stop": ["\n", "!"],
                  "stop_token_ids": [ids[1][1]]}),
        Template("generation logprobs", "/v1/completions", {**m, "prompt": texts[2], "max_tokens": 12,
                                                             "temperature": 0, "logprobs": 3}),
        Template("chat logprobs", "/v1/chat/completions", {**m, "messages": chat, "max_tokens": 20, "temperature": 0,
                                                           "logprobs": True, "top_logprobs": 2}),
        Template("chat json_schema", "/v1/chat/completions",
                 {**m, "messages": chat, "max_tokens": 40, "temperature": 0.7, "seed": 2,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}}),
        Template("chat json_object", "/v1/chat/completions", {**m, "messages": chat, "max_tokens": 24,
                                                               "temperature": 0, "response_format":
                                                                   {"type": "json_object"}}),
        Template("chat n sampled", "/v1/chat/completions", {**m, "messages": chat, "max_tokens": 16, "n": 2,
                                                            "temperature": 0.8, "top_p": 0.9, "seed": 11}),
        Template("generate trace", "/generate", {"prompt": texts[4], "max_new_tokens": 16, "trace": True}),
        Template("generate sampled", "/generate", {"prompt": texts[6], "max_new_tokens": 16, "temperature": 0.8,
                                                   "top_p": 0.9, "top_k": 50, "seed": 5}),
    ]


# --- answers, normalised for comparison --------------------------------------------------------------

def view(path: str, answer: dict) -> dict:
    """What must not change between two answers to one request (ids and timestamps may)."""
    if path == "/generate":
        steps = answer.get("trace", {}).get("steps")
        return {"text": answer["text"], "token_ids": answer["token_ids"], "finish_reason": answer["finish_reason"],
                "usage": answer["usage"], "trace_steps": len(steps) if steps is not None else None}
    choices = []
    for c in sorted(answer["choices"], key=lambda c: c["index"]):
        text = c["text"] if "text" in c else c["message"]["content"]
        lp = c.get("logprobs") or {}
        tokens = lp.get("tokens") or [item["token"] for item in lp.get("content") or []]
        values = lp.get("token_logprobs") or [item["logprob"] for item in lp.get("content") or []]
        choices.append({"index": c["index"], "text": text, "finish_reason": c["finish_reason"], "tokens": tokens,
                        "logprobs": values})
    return {"choices": choices, "usage": answer["usage"]}


def differences(got: dict, want: dict) -> str | None:
    """None when the views agree (logprobs within LOGPROB_TOLERANCE), else what differs."""
    if got.keys() != want.keys():
        return f"fields {sorted(got)} != {sorted(want)}"
    for key in got:
        if key == "choices":
            if len(got[key]) != len(want[key]):
                return f"{len(got[key])} choices, expected {len(want[key])}"
            for a, b in zip(got[key], want[key]):
                for k in ("index", "text", "finish_reason", "tokens"):
                    if a[k] != b[k]:
                        return f"choice {b['index']} {k}: {str(a[k])[:80]!r} != {str(b[k])[:80]!r}"
                if len(a["logprobs"]) != len(b["logprobs"]) or any(
                        (x is None) != (y is None) or (x is not None and abs(x - y) > LOGPROB_TOLERANCE)
                        for x, y in zip(a["logprobs"], b["logprobs"])):
                    return f"choice {b['index']} logprobs differ"
        elif got[key] != want[key]:
            return f"{key}: {str(got[key])[:120]!r} != {str(want[key])[:120]!r}"
    return None


def assemble_stream(path: str, events: list[dict]) -> dict:
    """A non-streamed answer rebuilt from SSE data events."""
    if path == "/generate":
        final = events[-1]
        if "trace" in final:
            final = {**final, "trace": {**final["trace"], "steps": [e for e in events[:-1]]}}
        return final
    texts, finish, tokens, values = defaultdict(str), {}, defaultdict(list), defaultdict(list)
    usage = None
    for event in events:
        if "error" in event:
            raise ValueError(f"stream error: {event['error']}")
        if not event["choices"]:
            usage = event["usage"]
        for c in event["choices"]:
            i = c["index"]
            texts[i] += c["text"] if "text" in c else c["delta"].get("content", "")
            finish[i] = c["finish_reason"] or finish.get(i)
            lp = c.get("logprobs") or {}
            tokens[i] += lp.get("tokens") or [item["token"] for item in lp.get("content") or []]
            values[i] += lp.get("token_logprobs") or [item["logprob"] for item in lp.get("content") or []]
    return {"choices": [{"index": i, "text": texts[i], "finish_reason": finish[i],
                         "logprobs": {"tokens": tokens[i], "token_logprobs": values[i]} if tokens[i] else None}
                        for i in sorted(texts)], "usage": usage}
