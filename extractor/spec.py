"""Id selections on the command line: `all`, or ids and ranges like `0-7,12,40-47`."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import ExtractError

SPEC_HELP = "'all', or ids and inclusive ranges such as 0-7,12,40-47"
_ITEM = re.compile(r"(\d+)(?:-(\d+))?")

Ranges = list[tuple[int, int]] | None  # None: all


def parse_spec(spec: str | Iterable[int], option: str) -> Ranges:
    """Syntax only (ranges stay ranges, so '0-99999999999' costs nothing until resolved)."""
    if not isinstance(spec, str):
        ids = list(spec)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ExtractError(f"{option}: ids must be non-negative integers, got {ids!r:.80}")
        return [(i, i) for i in ids]
    text = spec.strip()
    if text == "all":
        return None
    ranges = []
    for item in text.split(","):
        match = _ITEM.fullmatch(item.strip())
        if match is None:
            raise ExtractError(f"{option} {spec!r}: malformed, expected {SPEC_HELP}")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ExtractError(f"{option} {spec!r}: range {item.strip()} runs backwards")
        ranges.append((low, high))
    return ranges


def resolve_spec(ranges: Ranges, count: int, option: str, what: str) -> list[int]:
    """Sorted ids among 0..count-1; ExtractError names the first id out of range."""
    if ranges is None:
        return list(range(count))
    for _, high in ranges:
        if high >= count:
            raise ExtractError(f"{option}: {what} {high} out of range, the checkpoint has {count} (0-{count - 1})")
    return sorted({i for low, high in ranges for i in range(low, high + 1)})
