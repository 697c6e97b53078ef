"""Every token's bytes and display text, as OpenAI's logprobs report them.

Decoding a token alone does not give its bytes: a byte-level BPE token may hold part of
a UTF-8 character, and SentencePiece tokens spell spaces as U+2581 and single bytes as
<0xNN>. So the bytes come from the vocabulary's own spelling, by the tokenizer's kind:
- byte-level (GPT-2 style, a ByteLevel decoder): each character stands for one byte;
- byte-fallback (SentencePiece style): <0xNN> is that byte, U+2581 a space;
- anything else: the token decoded alone.
A token whose bytes are not valid UTF-8 is shown as OpenAI does: "bytes:\\xNN...".
"""

from __future__ import annotations

import json
from functools import cached_property

SPIECE_SPACE = "\u2581"


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the inverse of bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def decoder_kinds(tokenizer) -> set[str]:
    """Types of the tokenizer's decoder(s): {"ByteLevel"}, {"ByteFallback", "Metaspace", ...}."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {part.get("type") for part in parts}


class Vocabulary:
    """Token id -> bytes / text, built once per tokenizer (ids past the tokenizer: no bytes)."""

    def __init__(self, tokenizer, size: int):
        self.tokenizer, self.size = tokenizer, size

    @cached_property
    def token_bytes(self) -> list[bytes]:
        tok = self.tokenizer
        if tok is None:  # a store without a tokenizer: ids are all there is
            return [f"<{i}>".encode() for i in range(self.size)]
        pieces = [piece or "" for piece in tok.convert_ids_to_tokens(list(range(min(self.size, len(tok)))))]
        special = set(getattr(tok, "all_special_ids", []))
        kinds = decoder_kinds(tok)
        spell = self._spelling(kinds)
        table = [piece.encode() if i in special else spell(i, piece) for i, piece in enumerate(pieces)]
        return table + [b""] * (self.size - len(table))

    def _spelling(self, kinds: set[str]):
        if "ByteLevel" in kinds:
            chars = byte_level_decoder()
            return lambda i, piece: bytes(chars[c] for c in piece) if all(c in chars for c in piece) \
                else piece.encode()
        if kinds & {"ByteFallback", "Metaspace"} or SPIECE_SPACE in "".join(self.tokenizer.get_vocab()):
            def sentencepiece(i, piece):
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    return bytes([int(piece[3:5], 16)])
                return piece.replace(SPIECE_SPACE, " ").encode()
            return sentencepiece
        return lambda i, piece: self.tokenizer.decode([i]).encode()

    def text(self, token_id: int) -> str:
        raw = self.token_bytes[token_id] if 0 <= token_id < self.size else b""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def bytes_of(self, token_id: int) -> list[int]:
        return list(self.token_bytes[token_id]) if 0 <= token_id < self.size else []
