"""Constrained decoding for chat's `response_format` (json_object, json_schema), with outlines-core.

outlines-core turns a JSON schema into a regular expression and the regex, over the model's
vocabulary, into an index: for every automaton state, the tokens that keep the output a
prefix of a match. Each request walks its own `Guide` over the shared index; its sampler
masks every other token of its row (sampling.py), and once the output is complete only EOS
remains allowed, so generation ends there.

- json_schema: the schema as outlines-core reads it (an unsupported schema is a 400);
- json_object: the schema {"type": "object"}: any JSON object, nested up to outlines-core's
  default depth -- always valid JSON, though not every valid JSON object can be produced.

Building an index walks the whole vocabulary (the demo model's json_object: seconds), so it
runs off the event loop and is kept, per regex, for the next request.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

from .errors import APIError
from .threads import in_passing_thread

KEEP = 32  # compiled indexes kept (least recently used dropped)


def regex_for(response_format) -> str:
    """The regex a response_format admits; 400 naming response_format when it cannot be built."""
    try:  # imported here: a server without outlines-core serves everything but response_format
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        raise APIError(400, "response_format needs outlines-core, which this server lacks (pip install "
                            "outlines-core)", param="response_format", code="unsupported_parameter") from None
    if response_format.type == "json_object":
        schema = {"type": "object"}
    elif response_format.json_schema is None:
        raise APIError(400, "response_format json_schema needs a json_schema object", param="response_format")
    else:
        schema = response_format.json_schema.schema_
    try:
        return build_regex_from_schema(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 -- outlines-core's own message says what it cannot handle
        raise APIError(400, f"response_format: unsupported JSON schema ({exc})", param="response_format") from None


class Grammars:
    """Compiled indexes for one model's vocabulary, built on first use and kept."""

    def __init__(self, token_bytes: list[bytes], special_ids: set[int], eos_token_id: int):
        self.token_bytes, self.special_ids, self.eos_token_id = token_bytes, special_ids, eos_token_id
        self._vocabulary = None  # outlines_core.Vocabulary, built on first use
        self._indexes: OrderedDict[str, object] = OrderedDict()  # regex -> outlines_core.Index
        self._building: dict[str, asyncio.Future] = {}

    def vocabulary(self):
        """outlines-core's view: token bytes -> ids; special tokens other than EOS can never be chosen."""
        from outlines_core import Vocabulary

        if self._vocabulary is None:
            by_bytes: dict[bytes, list[int]] = {}
            for token, raw in enumerate(self.token_bytes):
                if raw and token not in self.special_ids and token != self.eos_token_id:
                    by_bytes.setdefault(raw, []).append(token)
            self._vocabulary = Vocabulary(self.eos_token_id, by_bytes)
        return self._vocabulary

    async def index(self, regex: str):
        """The outlines_core.Index for `regex`: cached, or built once in a passing thread (concurrent
        callers share it)."""
        from outlines_core import Index

        if regex in self._indexes:
            self._indexes.move_to_end(regex)
            return self._indexes[regex]
        building = self._building.get(regex)
        if building is None:
            building = asyncio.ensure_future(in_passing_thread(lambda: Index(regex, self.vocabulary())))
            self._building[regex] = building
            building.add_done_callback(lambda _: self._building.pop(regex, None))
        index = await asyncio.shield(building)
        self._indexes[regex] = index
        while len(self._indexes) > KEEP:
            self._indexes.popitem(last=False)
        return index
