"""Token ids -> text, one token at a time, with stop strings.

Decoding a token alone is wrong for byte-level BPE (a character may span tokens) and for
SentencePiece (leading spaces depend on the previous token), so each token's text is the
growth of a decode over a short window ending at it. A window that ends inside a UTF-8
character decodes to U+FFFD; that token's text is then empty and the next one carries it.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
WINDOW = 6  # tokens of left context: enough for any merge a tokenizer makes at a boundary


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it adds (possibly empty)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""  # an incomplete character, or a token with no text of its own
        piece = full[len(prefix):]
        self.text += piece
        self._read_offset = len(self.token_ids)
        self._prefix_offset = max(0, self._read_offset - WINDOW)
        return piece


class StopStrings:
    """Finds the first stop string in growing text; the output ends before it."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_chars: int) -> int | None:
        """Index where a stop string starts, searching only where the last `new_chars` could complete one."""
        if not self.stops or new_chars == 0:
            return None
        start = max(0, len(text) - new_chars - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def stable_length(self, text: str) -> int:
        """Characters that can no longer turn out to be part of a stop string (safe to stream)."""
        return max(0, len(text) - max(0, self.longest - 1))
