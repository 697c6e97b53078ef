"""Token logprobs in OpenAI's two shapes.

Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; top_logprobs[i]
maps token text -> logprob for the N most likely tokens plus the chosen one (up to N + 1
entries, as OpenAI documents). With echo the prompt's tokens come first, the very first
with null logprobs (nothing precedes it). Chat: {"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}, ...N]}]}.

Logprobs are the model's own distribution: log-softmax of the raw logits, before
penalties, logit_bias and temperature.
"""

from __future__ import annotations

from .sampling import StepResult
from .vocab import Vocabulary


def completion_logprobs(vocab: Vocabulary, token_ids: list[int], entries: list[StepResult | None],
                        offsets: list[int]) -> dict:
    top = []
    for token, entry in zip(token_ids, entries):
        if entry is None:
            top.append(None)
            continue
        alternatives = {vocab.text(t): lp for t, lp in entry.top}
        alternatives.setdefault(vocab.text(token), entry.logprob)
        top.append(alternatives)
    return {"tokens": [vocab.text(t) for t in token_ids],
            "token_logprobs": [e.logprob if e is not None else None for e in entries],
            "top_logprobs": top, "text_offset": list(offsets)}


def chat_logprobs(vocab: Vocabulary, token_ids: list[int], entries: list[StepResult]) -> dict:
    def item(token: int, logprob: float) -> dict:
        return {"token": vocab.text(token), "logprob": logprob, "bytes": vocab.bytes_of(token)}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(a, lp) for a, lp in e.top]}
                        for t, e in zip(token_ids, entries)]}


def text_offsets(detokenizer_pieces: list[str], start: int = 0) -> list[int]:
    """Where each token's text starts, given each token's piece of the text."""
    offsets, at = [], start
    for piece in detokenizer_pieces:
        offsets.append(at)
        at += len(piece)
    return offsets
